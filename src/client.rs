//! The typed client of the socket protocol. It always speaks version 2, pipelining `HELLO 2`
//! with its first request so the upgrade costs no round trip.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use zeroize::Zeroizing;

use crate::locked::extend_zeroizing;
use crate::protocol::{self, ProtocolError, Reply, Request, Version};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach op-bridge at {path}: {source}")]
    Unreachable { path: PathBuf, source: io::Error },
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
            ClientError::Refused(_) => crate::exit::ERR,
            _ => crate::exit::UNREACHABLE,
        }
    }
}

pub struct Client {
    path: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    version: Version,
    hello_sent: bool,
    timeout: Duration,
}

impl Client {
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Client, ClientError> {
        let unreachable = |source| ClientError::Unreachable { path: path.to_path_buf(), source };
        let stream = match tokio::time::timeout(timeout, UnixStream::connect(path)).await {
            Ok(stream) => stream.map_err(unreachable)?,
            Err(_) => return Err(ClientError::Timeout { path: path.to_path_buf(), after: timeout }),
        };
        let (read, writer) = stream.into_split();
        Ok(Client {
            path: path.to_path_buf(),
            reader: BufReader::new(read),
            writer,
            version: Version::V2,
            hello_sent: false,
            timeout,
        })
    }

    /// Sends several requests in one write and reads their replies in order.
    pub async fn call_many(&mut self, requests: &[Request]) -> Result<Vec<Reply>, ClientError> {
        let mut wire = Zeroizing::new(Vec::new());
        let first = !self.hello_sent;
        if first {
            extend_zeroizing(&mut wire, b"HELLO 2\n");
            self.hello_sent = true;
        }
        for request in requests {
            extend_zeroizing(&mut wire, &protocol::encode_request(request, Version::V2));
        }
        let path = self.path.clone();
        let after = self.timeout;
        let exchange = async {
            self.writer
                .write_all(&wire)
                .await
                .map_err(|source| ClientError::Unreachable { path: path.clone(), source })?;
            if first {
                self.version = match protocol::read_reply(&mut self.reader, Version::V1, false).await? {
                    Reply::Ok(v) if v == "2" => Version::V2,
                    _ => Version::V1,
                };
            }
            let mut replies = Vec::with_capacity(requests.len());
            for request in requests {
                let expect_value = matches!(request, Request::Get(_));
                replies.push(protocol::read_reply(&mut self.reader, self.version, expect_value).await?);
            }
            Ok(replies)
        };
        match tokio::time::timeout(after, exchange).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout { path, after }),
        }
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
