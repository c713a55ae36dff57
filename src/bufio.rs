//! A buffered reader for streams that carry secret values: its buffer is allocated once at a
//! fixed size, never grows (so no allocation holding a value is ever freed unwiped), is wiped
//! whenever everything in it has been consumed, and is wiped again when the reader is dropped.
//! It replaces tokio's `BufReader`, whose buffer is freed as is.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncBufRead, AsyncRead, ReadBuf};
use zeroize::{Zeroize, Zeroizing};

/// Size of a connection's read buffer: a pipeline of requests, or a slice of a frame.
pub const DEFAULT_CAPACITY: usize = 16 * 1024;

pub struct ZeroizingReader<R> {
    inner: R,
    buf: Zeroizing<Box<[u8]>>,
    pos: usize,
    filled: usize,
}

impl<R> ZeroizingReader<R> {
    pub fn new(inner: R) -> Self {
        Self::with_capacity(DEFAULT_CAPACITY, inner)
    }

    pub fn with_capacity(capacity: usize, inner: R) -> Self {
        ZeroizingReader { inner, buf: Zeroizing::new(vec![0u8; capacity.max(1)].into_boxed_slice()), pos: 0, filled: 0 }
    }

    /// The bytes read but not consumed yet.
    pub fn buffer(&self) -> &[u8] {
        &self.buf[self.pos..self.filled]
    }

    /// Wipes the bytes that were in the buffer and starts it over.
    fn reset(&mut self) {
        self.buf[..self.filled].zeroize();
        self.pos = 0;
        self.filled = 0;
    }
}

impl<R: AsyncRead + Unpin> AsyncBufRead for ZeroizingReader<R> {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        if this.pos >= this.filled {
            this.reset();
            let mut read = ReadBuf::new(&mut this.buf[..]);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            this.filled = read.filled().len();
        }
        Poll::Ready(Ok(&this.buf[this.pos..this.filled]))
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        let this = self.get_mut();
        this.pos = (this.pos + amt).min(this.filled);
        if this.pos == this.filled {
            this.reset();
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for ZeroizingReader<R> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        // A large read with nothing buffered goes straight to the caller's (zeroizing) buffer.
        if self.pos == self.filled && out.remaining() >= self.buf.len() {
            return Pin::new(&mut self.inner).poll_read(cx, out);
        }
        let available = ready!(self.as_mut().poll_fill_buf(cx))?;
        let n = available.len().min(out.remaining());
        out.put_slice(&available[..n]);
        self.consume(n);
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};

    #[tokio::test]
    async fn reads_lines_and_exact_frames_across_refills() {
        let data: &[u8] = b"one\ntwo\n0123456789abcdef\nrest";
        let mut reader = ZeroizingReader::with_capacity(5, data);
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        assert_eq!(line, "one\n");
        line.clear();
        reader.read_line(&mut line).await.unwrap();
        assert_eq!(line, "two\n");
        let mut frame = [0u8; 17];
        reader.read_exact(&mut frame).await.unwrap();
        assert_eq!(&frame, b"0123456789abcdef\n");
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"rest");
    }

    #[tokio::test]
    async fn consumed_bytes_are_wiped() {
        let data: &[u8] = b"secret\nnext";
        let mut reader = ZeroizingReader::with_capacity(64, data);
        let got = reader.fill_buf().await.unwrap().len();
        assert_eq!(got, data.len());
        Pin::new(&mut reader).consume(data.len());
        assert!(reader.buf.iter().all(|&b| b == 0), "a fully consumed buffer holds nothing");
        assert!(reader.buffer().is_empty());
    }
}
