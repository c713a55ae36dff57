//! One client connection: reads requests, answers them, enforces the per-connection limits.
//!
//! Replies are built in a zeroizing buffer and written when no further request is already
//! buffered, so pipelined requests cost one write. A protocol error becomes an `ERR` reply;
//! a fatal one (oversized line or frame, a request cut off, a timeout mid-request) also
//! closes the connection. Nothing here can take the server down.
//!
//! Every buffer that may hold a value is wiped before it is reused or freed: the read buffer
//! ([`ZeroizingReader`]), the request line, the reply buffer. Framed SET values and GET
//! replies are paid for from the peer uid's share of the [`ByteBudget`]; REFRESH goes through the
//! [`RefreshGate`].

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::sync::CancellationToken;
use zeroize::{Zeroize, Zeroizing};

use super::audit::AuditLog;
use super::broker::Broker;
use super::budget::{ByteBudget, BytePermit};
use super::peer::Peer;
use super::refresh::RefreshGate;
use crate::bufio::ZeroizingReader;
use crate::protocol::{self, ProtocolError, Request, Response, Version};

/// Bytes of replies buffered before they are written even mid-pipeline.
const FLUSH_AT: usize = 64 * 1024;
/// Capacity a connection keeps between requests; a buffer grown beyond it by one long line
/// or one large reply is wiped and freed, so idle connections hold little memory.
const KEEP_LINE: usize = 4096;
const KEEP_OUT: usize = 2 * FLUSH_AT;

#[derive(Debug, Clone)]
pub struct Limits {
    /// A connection with no request for this long is closed.
    pub idle: Duration,
    /// Once a request has started, it must be complete within this long; a reply must be
    /// taken by the peer within this long too.
    pub request: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { idle: Duration::from_secs(300), request: Duration::from_secs(10) }
    }
}

/// What every connection shares besides the broker.
#[derive(Clone)]
pub struct Shared {
    pub budget: Arc<ByteBudget>,
    pub refresh: Arc<RefreshGate>,
}

pub struct Connection {
    reader: ZeroizingReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    peer: Peer,
    broker: Arc<Broker>,
    shared: Shared,
    /// Budget held by the replies buffered in `out`, given back when they are written.
    reply_permit: Option<BytePermit>,
    audit: Option<Arc<AuditLog>>,
    limits: Limits,
    version: Version,
}

enum Step {
    Continue,
    Close,
}

impl Connection {
    pub fn new(
        stream: UnixStream,
        peer: Peer,
        broker: Arc<Broker>,
        audit: Option<Arc<AuditLog>>,
        limits: Limits,
        shared: Shared,
    ) -> Self {
        let (read, writer) = stream.into_split();
        Connection {
            reader: ZeroizingReader::new(read),
            writer,
            peer,
            broker,
            shared,
            reply_permit: None,
            audit,
            limits,
            version: Version::V1,
        }
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut line = Zeroizing::new(Vec::new());
        let mut out = Zeroizing::new(Vec::with_capacity(4096));
        // One idle timer per connection, re-armed lazily: a request only sets `active`, and
        // when the timer fires after activity it is pushed out again. A connection is thus
        // closed after one to two idle periods without a request, and a request costs no
        // timer registration (the profile showed per-request timers as the largest waste).
        let idle = tokio::time::sleep(self.limits.idle);
        tokio::pin!(idle);
        let mut active = false;
        loop {
            if self.reader.buffer().is_empty() {
                if self.flush(&mut out).await.is_err() {
                    return;
                }
                let ready = tokio::select! {
                    ready = self.reader.fill_buf() => ready.map(|buf| !buf.is_empty()),
                    _ = &mut idle => {
                        if std::mem::take(&mut active) {
                            idle.as_mut().reset(tokio::time::Instant::now() + self.limits.idle);
                            continue;
                        }
                        protocol::encode_response(&mut out, &Response::Err("idle timeout".into()), self.version);
                        let _ = self.flush(&mut out).await;
                        return;
                    }
                    _ = shutdown.cancelled() => return,
                };
                if !matches!(ready, Ok(true)) {
                    return;
                }
            }
            active = true;
            // A framed value is read into memory only once the budget has room for it.
            let mut frame_permit: Option<BytePermit> = None;
            let budget = self.shared.budget.clone();
            let uid = self.peer.uid;
            let mut admit = |len: usize| budget.take_into(uid, len, &mut frame_permit);
            let buffered = self.request_is_buffered();
            let reading = protocol::read_request_admitting(&mut self.reader, self.version, &mut line, &mut admit);
            let read = if buffered {
                Ok(reading.await)
            } else {
                // The rest of the request must arrive within the request timeout.
                tokio::time::timeout(self.limits.request, reading).await
            };
            let step = match read {
                Err(_) => {
                    self.reply_error(&mut out, None, &ProtocolError::Malformed("request timed out".into()));
                    Step::Close
                }
                Ok(Ok(None)) => Step::Close,
                Ok(Ok(Some(request))) => {
                    let step = self.dispatch(request, &mut out).await;
                    wipe(&mut line);
                    step
                }
                Ok(Err(err)) => {
                    wipe(&mut line);
                    if matches!(err, ProtocolError::Busy) {
                        tracing::warn!(
                            pid = self.peer.pid,
                            used = self.shared.budget.used(),
                            "in-flight byte budget spent; refusing a framed value"
                        );
                    }
                    self.reply_error(&mut out, None, &err);
                    if err.is_fatal() { Step::Close } else { Step::Continue }
                }
            };
            if line.capacity() > KEEP_LINE {
                line = Zeroizing::new(Vec::new());
            }
            drop(frame_permit);
            if matches!(step, Step::Close) {
                let _ = self.flush(&mut out).await;
                return;
            }
            if out.len() >= FLUSH_AT && self.flush(&mut out).await.is_err() {
                return;
            }
        }
    }

    /// Whether the next request is already complete in the buffer, so reading it cannot
    /// block: a whole line, and not a version-2 SET (whose frame follows the line).
    fn request_is_buffered(&self) -> bool {
        let buffer = self.reader.buffer();
        let Some(end) = buffer.iter().position(|&b| b == b'\n') else { return false };
        self.version == Version::V1 || !buffer[..end].get(..4).is_some_and(|w| w.eq_ignore_ascii_case(b"SET "))
    }

    fn reply_error(&self, out: &mut Vec<u8>, command: Option<&str>, err: &ProtocolError) {
        if let ProtocolError::Io(_) = err {
            return;
        }
        tracing::debug!(pid = self.peer.pid, "bad request: {err}");
        self.audit_record(command.unwrap_or("INVALID"), None, "error");
        protocol::encode_response(out, &Response::Err(err.to_string()), self.version);
    }

    fn audit_record(&self, command: &str, name: Option<&str>, result: &str) {
        if let Some(audit) = &self.audit {
            audit.record(&self.peer, command, name, result);
        }
    }

    async fn dispatch(&mut self, request: Request, out: &mut Vec<u8>) -> Step {
        let command = request.command();
        // The name outlives the request only for the audit log and trace logging.
        let name = (self.audit.is_some() || tracing::enabled!(tracing::Level::TRACE))
            .then(|| request.name().map(str::to_string))
            .flatten();
        tracing::trace!(pid = self.peer.pid, command, name = name.as_deref(), "request");
        let broker = &self.broker;
        let ok = |out: &mut Vec<u8>, r: Response<'_>, version| protocol::encode_response(out, &r, version);
        let result: Result<(), String> = match request {
            Request::Hello(v) if v == 1 || v == 2 => {
                self.version = if v == 2 { Version::V2 } else { Version::V1 };
                ok(out, Response::Text(v.to_string()), self.version);
                Ok(())
            }
            Request::Hello(v) => Err(format!("unsupported protocol version {v} (supported: 1, 2)")),
            Request::Ping => {
                ok(out, Response::Text("pong".into()), self.version);
                Ok(())
            }
            Request::List => {
                ok(out, Response::Text(broker.store.names().join(",")), self.version);
                Ok(())
            }
            Request::ProxyEnv => match broker.proxy_env() {
                Some(vars) => {
                    let map: serde_json::Map<String, serde_json::Value> =
                        vars.iter().map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str()))).collect();
                    ok(out, Response::Text(serde_json::Value::Object(map).to_string()), self.version);
                    Ok(())
                }
                None => Err("no egress proxy (start op-bridge with --proxy)".into()),
            },
            Request::Status => {
                ok(out, Response::Text(broker.status().await.to_string()), self.version);
                Ok(())
            }
            Request::Get(target) => {
                let version = self.version;
                let budget = &self.shared.budget;
                let uid = self.peer.uid;
                let held = &mut self.reply_permit;
                broker
                    .lookup(&target, |value| {
                        if !budget.take_into(uid, value.len(), held) {
                            return Err(protocol::ProtocolError::Busy.to_string());
                        }
                        ok(out, Response::Value(value), version);
                        Ok(())
                    })
                    .and_then(|encoded| encoded)
                    .inspect(|()| {
                        // Every raw read of a bound secret is audited, whatever the audit level.
                        if let Some(name) = broker.target_name(&target).filter(|n| broker.bindings().is_raw(n)) {
                            tracing::info!(pid = self.peer.pid, name, "raw read of bound secret {name} (--allow-raw)");
                            if let Some(audit) = &self.audit {
                                audit.record(&self.peer, "GET", Some(&name), "ok raw-bound");
                            }
                        }
                    })
            }
            Request::Delete(name) => broker.delete(&name).map(|()| ok(out, Response::Ok, self.version)),
            Request::Set { name, uri, value } => {
                broker.set(&name, uri.as_deref(), value).await.map(|()| ok(out, Response::Ok, self.version))
            }
            Request::Refresh => {
                self.shared.refresh.refresh().await.map(|text| ok(out, Response::Text(text), self.version))
            }
        };
        match result {
            Ok(()) => self.audit_record(command, name.as_deref(), "ok"),
            Err(message) => {
                self.audit_record(command, name.as_deref(), "error");
                tracing::debug!(pid = self.peer.pid, command, "request refused: {message}");
                protocol::encode_response(out, &Response::Err(message), self.version);
            }
        }
        Step::Continue
    }

    async fn flush(&mut self, out: &mut Zeroizing<Vec<u8>>) -> std::io::Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        // Usually the socket takes the whole reply at once: no timer needed.
        let sent = match self.writer.try_write(out) {
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(err) => {
                wipe(out);
                self.reply_permit = None;
                return Err(err);
            }
        };
        // A peer that stops reading would otherwise hold this task and its connection slot
        // forever; the rest of a reply gets the same bound as a request.
        let written = if sent == out.len() {
            Ok(())
        } else {
            match tokio::time::timeout(self.limits.request, self.writer.write_all(&out[sent..])).await {
                Ok(written) => written,
                Err(_) => {
                    tracing::debug!(pid = self.peer.pid, "peer is not reading replies; closing the connection");
                    Err(std::io::ErrorKind::TimedOut.into())
                }
            }
        };
        wipe(out);
        if out.capacity() > KEEP_OUT {
            *out = Zeroizing::new(Vec::with_capacity(4096));
        }
        self.reply_permit = None;
        written
    }
}

/// Zeroizes the used part of a buffer and empties it, keeping its capacity for reuse.
fn wipe(buf: &mut Zeroizing<Vec<u8>>) {
    buf.as_mut_slice().zeroize();
    buf.clear();
}
