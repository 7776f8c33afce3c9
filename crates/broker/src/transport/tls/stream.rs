//! The server side of a TLS connection, over rustls's unbuffered API.
//!
//! rustls's buffered `ServerConnection` keeps a receive buffer that it resizes
//! to 4 KB before every read and never frees, plus queues of its own: with a
//! fleet of mostly idle devices that is most of the broker's memory. Here the
//! connection owns no buffer while it has nothing in it: received TLS records
//! are read into a buffer taken from this thread's spare and handed back as
//! soon as no partial record is left in it, and encrypted output is held only
//! until the socket has taken it (see `spare`).
//!
//! Records are decrypted in place in the receive buffer (rustls's unbuffered
//! API); what the reader has no room for waits in `plain`. Writing encrypts at
//! most [`MAX_WRITE`] bytes per call and does not take more until the socket
//! has taken what was encrypted before (back-pressure: `poll_write` is
//! `Pending` while the socket is full).
//!
//! Alerts rustls queues when it refuses a connection (a client certificate from
//! an unknown CA, a bad record) are sent before the error is returned.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, InsufficientSizeError,
    UnbufferedStatus,
};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The largest TLS record on the wire (16 KB of data plus the most a cipher
/// may add, and the header): the receive buffer's usual size.
const MAX_RECORD: usize = 16_384 + 2048 + 5;
/// A handshake message may span records and must be whole before it is
/// processed (a long client certificate chain): the receive buffer grows to
/// this much for one, as rustls's own buffer does.
const MAX_BUFFERED: usize = 0xffff + MAX_RECORD;
/// Plaintext encrypted per write call: four full records.
const MAX_WRITE: usize = 4 * 16_384;
/// How long a refused client is given to take the alert that says why.
const ALERT_GRACE: Duration = Duration::from_secs(1);

/// Completes the server side of a TLS handshake on `io`. On failure, the
/// alert rustls chose (if any) has been sent, or given [`ALERT_GRACE`] to go.
pub async fn accept<S>(config: Arc<ServerConfig>, io: S) -> io::Result<TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let conn = UnbufferedServerConnection::new(config).map_err(io::Error::other)?;
    let mut stream = TlsStream {
        io,
        conn,
        incoming: Buf::default(),
        out: Buf::default(),
        plain: Vec::new(),
        plain_pos: 0,
        peer_closed: false,
        eof: false,
        write_closed: false,
        failed: None,
        records_waiting: false,
    };
    match poll_fn(|cx| stream.poll_handshake(cx)).await {
        Ok(()) => Ok(stream),
        Err(e) => {
            let _ =
                tokio::time::timeout(ALERT_GRACE, poll_fn(|cx| stream.poll_flush_out(cx))).await;
            Err(e)
        }
    }
}

/// A TLS connection past its handshake, read and written as a byte stream.
pub struct TlsStream<S> {
    io: S,
    conn: UnbufferedServerConnection,
    /// TLS bytes received and not yet processed (a partial record, or a
    /// handshake message spanning records).
    incoming: Buf,
    /// TLS bytes to send.
    out: Buf,
    /// Decrypted data the reader had no room for: `plain[plain_pos..]`.
    plain: Vec<u8>,
    plain_pos: usize,
    /// The client sent close_notify: the end of its data.
    peer_closed: bool,
    /// The socket reached its end.
    eof: bool,
    /// close_notify has been queued: nothing more may be written.
    write_closed: bool,
    /// What ended the connection; every later call returns it.
    failed: Option<rustls::Error>,
    /// rustls may hold decrypted records a reader has not taken yet.
    records_waiting: bool,
}

impl<S> TlsStream<S> {
    /// The client's certificate chain, end-entity first, if it sent one.
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.conn.peer_certificates()
    }

    /// The protocol agreed through ALPN.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    /// The rustls connection (version, cipher suite...).
    pub fn connection(&self) -> &UnbufferedServerConnection {
        &self.conn
    }

    /// How many bytes of buffer this stream holds on the heap (beyond rustls's
    /// own state): zero for an idle connection.
    pub fn buffered_capacity(&self) -> usize {
        self.incoming.buf.capacity() + self.out.buf.capacity() + self.plain.capacity()
    }
}

impl<S: crate::transport::Wire> crate::transport::Wire for TlsStream<S> {
    fn input_waiting(&self) -> bool {
        // Plaintext or records already taken from the socket are returned by the next
        // read without waiting; otherwise, what the socket holds.
        self.plain_pos < self.plain.len()
            || self.records_waiting
            || self.peer_closed
            || self.eof
            || self.io.input_waiting()
    }
}

/// What a call into rustls is for.
enum Job<'a, 'b> {
    /// Drive the handshake; leave application data where it is.
    Handshake,
    /// Decrypt application data into the reader's buffer.
    Read(&'a mut ReadBuf<'b>),
    /// Encrypt this into `out`.
    Write(&'a [u8]),
    /// Queue close_notify into `out`.
    Close,
}

/// Where a call into rustls stopped.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// More TLS bytes are needed from the client.
    NeedInput,
    /// The job is done (a read found what it can take, a write or close was
    /// encrypted) with this many plaintext bytes taken.
    Done(usize),
    /// Both sides have sent close_notify.
    Closed,
}

enum Step {
    Again,
    Return(Outcome),
    Fail(rustls::Error),
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream<S> {
    /// Runs rustls's state machine over the received bytes until it needs more
    /// input or `job` is done. Handshake records it produces go to `out`.
    fn process(&mut self, job: &mut Job<'_, '_>) -> Result<Outcome, rustls::Error> {
        let read_from = match job {
            Job::Read(dst) => dst.filled().len(),
            _ => 0,
        };
        loop {
            let live = &mut self.incoming.buf[self.incoming.start..self.incoming.end];
            let UnbufferedStatus { mut discard, state } = self.conn.process_tls_records(live);
            let mut read_traffic = false;
            let step = match state {
                Err(e) => Step::Fail(e),
                Ok(ConnectionState::ReadTraffic(mut records)) => {
                    read_traffic = true;
                    let mut step = Step::Again;
                    while let Some(len) = records.peek_len() {
                        match job {
                            // Left for the reader that follows the handshake.
                            Job::Handshake => {
                                self.records_waiting = true;
                                step = Step::Return(Outcome::Done(0));
                                break;
                            }
                            // A record that does not fit waits for the next
                            // read, unless this read has nothing yet.
                            Job::Read(dst)
                                if dst.remaining() == 0
                                    || (dst.filled().len() > read_from
                                        && len.get() > dst.remaining()) =>
                            {
                                self.records_waiting = true;
                                step = Step::Return(Outcome::Done(0));
                                break;
                            }
                            _ => {}
                        }
                        match records.next_record() {
                            Some(Ok(record)) => {
                                discard += record.discard;
                                let mut data = record.payload;
                                if let Job::Read(dst) = job {
                                    let n = data.len().min(dst.remaining());
                                    dst.put_slice(&data[..n]);
                                    data = &data[n..];
                                }
                                // Compacted first: `plain` only grows when
                                // the reader has taken what it held.
                                if !data.is_empty() {
                                    if self.plain_pos == self.plain.len() {
                                        self.plain.clear();
                                        self.plain_pos = 0;
                                    }
                                    self.plain.extend_from_slice(data);
                                }
                            }
                            Some(Err(e)) => {
                                step = Step::Fail(e);
                                break;
                            }
                            None => break,
                        }
                    }
                    step
                }
                Ok(ConnectionState::EncodeTlsData(mut record)) => {
                    encode(&mut self.out, &mut record);
                    Step::Again
                }
                // Ours to send from `out`, which the callers flush.
                Ok(ConnectionState::TransmitTlsData(t)) => {
                    t.done();
                    Step::Again
                }
                Ok(ConnectionState::BlockedHandshake) => {
                    self.records_waiting = false;
                    Step::Return(Outcome::NeedInput)
                }
                Ok(ConnectionState::PeerClosed) => {
                    self.peer_closed = true;
                    Step::Again
                }
                Ok(ConnectionState::Closed) => {
                    self.peer_closed = true;
                    Step::Return(Outcome::Closed)
                }
                // The handshake is done (or, in TLS 1.3, our side of it).
                Ok(ConnectionState::WriteTraffic(mut w)) => match job {
                    Job::Handshake | Job::Read(_) => {
                        self.records_waiting = false;
                        Step::Return(Outcome::NeedInput)
                    }
                    Job::Write(data) => {
                        // Each record adds at most a header, a nonce, a tag and a content type.
                        let mut need = data.len() + 32 * (data.len() / 16_384 + 1);
                        loop {
                            self.out.reserve(need);
                            match w.encrypt(data, self.out.room()) {
                                Ok(n) => {
                                    self.out.end += n;
                                    break Step::Return(Outcome::Done(data.len()));
                                }
                                Err(EncryptError::InsufficientSize(InsufficientSizeError {
                                    required_size,
                                })) => need = required_size,
                                Err(e) => break Step::Fail(rustls::Error::General(e.to_string())),
                            }
                        }
                    }
                    Job::Close => {
                        let mut need = 64;
                        loop {
                            self.out.reserve(need);
                            match w.queue_close_notify(self.out.room()) {
                                Ok(n) => {
                                    self.out.end += n;
                                    self.write_closed = true;
                                    break Step::Return(Outcome::Done(0));
                                }
                                Err(EncryptError::InsufficientSize(InsufficientSizeError {
                                    required_size,
                                })) => need = required_size,
                                Err(e) => break Step::Fail(rustls::Error::General(e.to_string())),
                            }
                        }
                    }
                },
                // Early data is not enabled; nothing else is expected.
                Ok(other) => Step::Fail(rustls::Error::General(format!(
                    "unexpected TLS state {other:?}"
                ))),
            };
            self.incoming.consume(discard);
            match step {
                // Every record received has been read and nothing is left to
                // process or send: rustls would only say it needs more input.
                Step::Again
                    if read_traffic
                        && self.incoming.is_empty()
                        && !self.conn.wants_write()
                        && matches!(job, Job::Read(_) | Job::Handshake) =>
                {
                    self.records_waiting = false;
                    return Ok(Outcome::NeedInput);
                }
                Step::Again => continue,
                Step::Return(outcome) => return Ok(outcome),
                Step::Fail(e) => return Err(e),
            }
        }
    }

    /// Records a fatal error and queues into `out` whatever rustls has to say
    /// about it (an alert), for the caller to send.
    fn fail(&mut self, e: rustls::Error) -> io::Error {
        self.failed = Some(e.clone());
        // After an error rustls hands out what it queued (the alert) and then
        // repeats the error; bounded in case it does something else.
        for _ in 0..8 {
            let live = &mut self.incoming.buf[self.incoming.start..self.incoming.end];
            let UnbufferedStatus { discard, state } = self.conn.process_tls_records(live);
            let more = match state {
                Ok(ConnectionState::EncodeTlsData(mut record)) => {
                    encode(&mut self.out, &mut record);
                    true
                }
                Ok(ConnectionState::TransmitTlsData(t)) => {
                    t.done();
                    true
                }
                Ok(ConnectionState::ReadTraffic(mut records)) => {
                    while let Some(Ok(_)) = records.next_record() {}
                    true
                }
                _ => false,
            };
            self.incoming.consume(discard);
            if !more {
                break;
            }
        }
        to_io(e)
    }

    fn failure(&self) -> Option<io::Error> {
        self.failed.clone().map(to_io)
    }

    /// Sends what `out` holds; `Ready(Ok)` once the socket has taken it all.
    fn poll_flush_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let pending = &self.out.buf[self.out.start..self.out.end];
            match ready!(Pin::new(&mut self.io).poll_write(cx, pending)) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.out.consume(n),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        spare::put_out(&mut self.out);
        Poll::Ready(Ok(()))
    }

    /// Reads from the socket into `incoming`: `Ready(Ok(0))` at its end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let inc = &mut self.incoming;
        if inc.buf.is_empty() {
            inc.buf = spare::take_in();
        }
        if inc.start > 0 {
            inc.compact();
        }
        if inc.end == inc.buf.len() {
            // Full of one handshake message in pieces: grow, within reason.
            if inc.buf.len() >= MAX_BUFFERED {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "TLS message too large",
                )));
            }
            let size = (inc.buf.len() * 2).clamp(MAX_RECORD, MAX_BUFFERED);
            inc.buf.resize(size, 0);
        }
        let mut rb = ReadBuf::new(&mut inc.buf[inc.end..]);
        match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                self.incoming.end += n;
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                self.release_incoming();
                Poll::Pending
            }
        }
    }

    /// An idle connection holds no receive buffer.
    fn release_incoming(&mut self) {
        if self.incoming.is_empty() {
            spare::put_in(&mut self.incoming);
        }
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if let Err(e) = self.process(&mut Job::Handshake) {
                let e = self.fail(e);
                let _ = self.poll_flush_out(cx);
                return Poll::Ready(Err(e));
            }
            // Our flight goes out before we wait for the client's next one.
            ready!(self.poll_flush_out(cx))?;
            ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            if !self.conn.is_handshaking() {
                self.release_incoming();
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tls handshake eof",
                )));
            }
            if ready!(self.poll_fill(cx))? == 0 {
                self.eof = true;
            }
        }
    }
}

/// Copies a handshake record rustls produced into `out`.
fn encode<D>(out: &mut Buf, record: &mut EncodeTlsData<'_, D>) {
    let mut need = 512;
    loop {
        out.reserve(need);
        match record.encode(out.room()) {
            Ok(n) => {
                out.end += n;
                return;
            }
            Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                need = required_size
            }
            Err(EncodeError::AlreadyEncoded) => return,
        }
    }
}

fn unexpected_eof() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "peer closed connection without sending TLS close_notify",
    )
}

fn to_io(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if dst.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if this.plain_pos < this.plain.len() {
            let n = (this.plain.len() - this.plain_pos).min(dst.remaining());
            dst.put_slice(&this.plain[this.plain_pos..this.plain_pos + n]);
            this.plain_pos += n;
            if this.plain_pos == this.plain.len() {
                this.plain = Vec::new();
                this.plain_pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        if let Some(e) = this.failure() {
            return Poll::Ready(Err(e));
        }
        if this.peer_closed {
            return Poll::Ready(Ok(()));
        }
        let before = dst.filled().len();
        // Nothing received waits to be processed (the usual case for a read
        // that follows another): straight to the socket.
        let mut skip =
            this.incoming.is_empty() && !this.records_waiting && !this.conn.wants_write();
        loop {
            if skip {
                skip = false;
                if this.eof {
                    return Poll::Ready(Err(unexpected_eof()));
                }
                if ready!(this.poll_fill(cx))? == 0 {
                    this.eof = true;
                }
                continue;
            }
            let outcome = this.process(&mut Job::Read(dst));
            // What processing queued (the answer to a KeyUpdate, an alert)
            // goes out now if the socket takes it, without waiting for it.
            let flushed = this.poll_flush_out(cx);
            if let Err(e) = outcome {
                // A last try to send the alert that says why.
                let e = this.fail(e);
                let _ = this.poll_flush_out(cx);
                return Poll::Ready(Err(e));
            }
            if let Poll::Ready(Err(e)) = flushed {
                return Poll::Ready(Err(e));
            }
            if dst.filled().len() > before || this.peer_closed {
                this.release_incoming();
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Err(unexpected_eof()));
            }
            if ready!(this.poll_fill(cx))? == 0 {
                this.eof = true;
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.failure() {
            return Poll::Ready(Err(e));
        }
        if this.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "TLS connection closed for writing",
            )));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        // Back-pressure: what was encrypted before is on its way first.
        ready!(this.poll_flush_out(cx))?;
        let chunk = &data[..data.len().min(MAX_WRITE)];
        match this.process(&mut Job::Write(chunk)) {
            Ok(Outcome::Done(n)) => {
                // Sent now as far as the socket takes it; the rest goes with
                // the next write or flush.
                if let Poll::Ready(Err(e)) = this.poll_flush_out(cx) {
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(n))
            }
            Ok(_) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "TLS connection closed",
            ))),
            Err(e) => {
                let e = this.fail(e);
                let _ = this.poll_flush_out(cx);
                Poll::Ready(Err(e))
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_flush_out(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_closed && this.failed.is_none() {
            match this.process(&mut Job::Close) {
                Ok(_) => this.write_closed = true,
                Err(e) => return Poll::Ready(Err(this.fail(e))),
            }
        }
        ready!(this.poll_flush_out(cx))?;
        match ready!(Pin::new(&mut this.io).poll_shutdown(cx)) {
            Err(e) if e.kind() != io::ErrorKind::NotConnected => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(())),
        }
    }
}

/// Bytes `buf[start..end]`. `buf` is initialised to its full length, so reads
/// and encryption go straight into `buf[end..]`; an empty `buf` holds no memory.
#[derive(Default)]
struct Buf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Buf {
    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        debug_assert!(self.start <= self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    fn compact(&mut self) {
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
    }

    /// Room for at least `n` more bytes at the end (for `out`: an empty
    /// buffer is taken from the thread's spare).
    fn reserve(&mut self, n: usize) {
        if self.buf.is_empty() {
            self.buf = spare::take_out();
        }
        if self.buf.len() - self.end >= n {
            return;
        }
        if self.start > 0 {
            self.compact();
        }
        if self.buf.len() - self.end < n {
            self.buf.resize(self.end + n, 0);
        }
    }

    fn room(&mut self) -> &mut [u8] {
        &mut self.buf[self.end..]
    }
}

/// One spare receive and one spare send buffer per runtime thread, as
/// `connection`'s MQTT buffers: a connection holds one only while there is
/// something in it.
mod spare {
    use std::cell::Cell;

    use super::{Buf, MAX_RECORD, MAX_WRITE};

    /// Receive buffers that grew for a large handshake message are freed.
    const IN_SIZE: usize = MAX_RECORD;
    const OUT_INITIAL: usize = 4096;
    /// Room for one write's records and their overhead.
    const OUT_KEEP_MAX: usize = MAX_WRITE + 4 * 512;

    thread_local! {
        pub(super) static IN: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
        static OUT: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
    }

    pub(super) fn take_in() -> Vec<u8> {
        let buf = IN.try_with(Cell::take).unwrap_or_default();
        if buf.is_empty() {
            vec![0; IN_SIZE]
        } else {
            buf
        }
    }

    pub(super) fn take_out() -> Vec<u8> {
        let buf = OUT.try_with(Cell::take).unwrap_or_default();
        if buf.is_empty() {
            vec![0; OUT_INITIAL]
        } else {
            buf
        }
    }

    /// Takes `b`'s (empty) buffer for this thread's next connection.
    pub(super) fn put_in(b: &mut Buf) {
        debug_assert!(b.is_empty());
        let buf = std::mem::take(&mut b.buf);
        if buf.len() == IN_SIZE {
            let _ = IN.try_with(|c| c.set(buf));
        }
    }

    pub(super) fn put_out(b: &mut Buf) {
        debug_assert!(b.is_empty());
        let buf = std::mem::take(&mut b.buf);
        if !buf.is_empty() && buf.len() <= OUT_KEEP_MAX {
            let _ = OUT.try_with(|c| c.set(buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use rustls::pki_types::{PrivateKeyDer, ServerName};
    use rustls::{ClientConfig, RootCertStore};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use crate::transport::tls::{server_config, TlsOptions};

    struct Pki {
        server: Arc<ServerConfig>,
        ca: CertificateDer<'static>,
        client: (CertificateDer<'static>, PrivateKeyDer<'static>),
        /// A client certificate from a CA the server does not know.
        rogue: (CertificateDer<'static>, PrivateKeyDer<'static>),
    }

    fn ca(name: &str) -> (rcgen::Certificate, rcgen::Issuer<'static, rcgen::KeyPair>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        (cert, rcgen::Issuer::new(params, key))
    }

    fn leaf(
        issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
        names: Vec<String>,
    ) -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, issuer)
            .unwrap();
        (cert, key)
    }

    fn pki(opts: TlsOptions) -> Pki {
        let (ca_cert, issuer) = ca("fleet CA");
        let (rogue_ca, rogue_issuer) = ca("rogue CA");
        drop(rogue_ca);
        let (server_cert, server_key) = leaf(&issuer, vec!["localhost".into()]);
        let (client_cert, client_key) = leaf(&issuer, vec![]);
        let (rogue_cert, rogue_key) = leaf(&rogue_issuer, vec![]);
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, pem: String| {
            let p = dir.path().join(name);
            std::fs::write(&p, pem).unwrap();
            p
        };
        let server = server_config(
            &write("server.pem", server_cert.pem()),
            &write("server.key", server_key.serialize_pem()),
            &write("ca.pem", ca_cert.pem()),
            &opts,
        )
        .unwrap();
        let der = |k: &rcgen::KeyPair| PrivateKeyDer::try_from(k.serialize_der()).unwrap();
        Pki {
            server,
            ca: ca_cert.der().clone(),
            client: (client_cert.der().clone(), der(&client_key)),
            rogue: (rogue_cert.der().clone(), der(&rogue_key)),
        }
    }

    fn client_config(
        pki: &Pki,
        version: &'static rustls::SupportedProtocolVersion,
        cert: Option<&(CertificateDer<'static>, PrivateKeyDer<'static>)>,
    ) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(pki.ca.clone()).unwrap();
        let builder =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(roots);
        let cfg = match cert {
            Some((c, k)) => builder
                .with_client_auth_cert(vec![c.clone()], k.clone_key())
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        Arc::new(cfg)
    }

    const VERSIONS: [&rustls::SupportedProtocolVersion; 2] =
        [&rustls::version::TLS13, &rustls::version::TLS12];

    /// A handshaken pair over an in-memory pipe of `pipe` bytes each way.
    async fn pair(
        pki: &Pki,
        version: &'static rustls::SupportedProtocolVersion,
        pipe: usize,
    ) -> (
        TlsStream<DuplexStream>,
        tokio_rustls::client::TlsStream<DuplexStream>,
    ) {
        let (c, s) = tokio::io::duplex(pipe);
        let connector =
            tokio_rustls::TlsConnector::from(client_config(pki, version, Some(&pki.client)));
        let name = ServerName::try_from("localhost").unwrap();
        let (server, client) =
            tokio::join!(accept(pki.server.clone(), s), connector.connect(name, c));
        let server = server.unwrap();
        assert_eq!(
            server.connection().protocol_version(),
            Some(version.version)
        );
        assert!(server.peer_certificates().is_some_and(|c| c.len() == 1));
        (server, client.unwrap())
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
            .collect()
    }

    /// Polls a read once: `None` if it is pending.
    async fn try_read(
        s: &mut TlsStream<DuplexStream>,
        buf: &mut [u8],
    ) -> Option<io::Result<usize>> {
        poll_fn(|cx| {
            let mut rb = ReadBuf::new(buf);
            match Pin::new(&mut *s).poll_read(cx, &mut rb) {
                Poll::Pending => Poll::Ready(None),
                Poll::Ready(r) => Poll::Ready(Some(r.map(|()| rb.filled().len()))),
            }
        })
        .await
    }

    /// 1 MB each way through a 4 KB pipe: records of every size, writes larger
    /// than a record, reads smaller than one, back-pressure on both sides.
    #[tokio::test]
    async fn large_data_round_trips_both_ways_over_tls_1_2_and_1_3() {
        let pki = pki(TlsOptions::default());
        for version in VERSIONS {
            let (mut server, client) = pair(&pki, version, 4096).await;
            let up = pattern(1 << 20, 1);
            let down = pattern((1 << 20) + 17, 2);
            let (up2, down2) = (up.clone(), down.clone());
            let server_side = async move {
                // Echo in odd-sized pieces, then send `down`.
                let mut got = Vec::new();
                let mut buf = vec![0; 3000];
                while got.len() < up2.len() {
                    let n = server.read(&mut buf).await.unwrap();
                    assert!(n > 0);
                    got.extend_from_slice(&buf[..n]);
                }
                assert!(got == up2, "server received corrupted data");
                server.write_all(&down2).await.unwrap();
                server.flush().await.unwrap();
                server.shutdown().await.unwrap();
                // The client's close_notify ends the server's input cleanly.
                assert_eq!(server.read(&mut buf).await.unwrap(), 0);
                server
            };
            let client_side = async move {
                let (mut rd, mut wr) = tokio::io::split(client);
                let send = async {
                    for piece in up.chunks(50_000) {
                        wr.write_all(piece).await.unwrap();
                    }
                    wr.flush().await.unwrap();
                };
                let recv = async {
                    let mut got = Vec::new();
                    rd.read_to_end(&mut got).await.unwrap();
                    got
                };
                let ((), got) = tokio::join!(send, recv);
                assert!(got == down, "client received corrupted data");
                wr.shutdown().await.unwrap();
            };
            let (server, ()) = tokio::join!(server_side, client_side);
            assert_eq!(server.buffered_capacity(), 0, "{version:?}");
        }
    }

    /// The client renews its keys (and asks the server to): data still flows
    /// both ways, and the server's answer reaches the client with its next write.
    #[tokio::test]
    async fn client_key_update_is_followed() {
        let pki = pki(TlsOptions::default());
        let (mut server, mut client) = pair(&pki, &rustls::version::TLS13, 1 << 16).await;
        let mut buf = [0; 64];
        for round in 0..3u8 {
            client.write_all(&[round; 10]).await.unwrap();
            client.get_mut().1.refresh_traffic_keys().unwrap();
            client.write_all(&[round + 100; 10]).await.unwrap();
            client.flush().await.unwrap();
            let mut got = Vec::new();
            while got.len() < 20 {
                let n = server.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            assert_eq!(&got[..10], &[round; 10]);
            assert_eq!(&got[10..], &[round + 100; 10]);
            server.write_all(b"pong").await.unwrap();
            server.flush().await.unwrap();
            let mut pong = [0; 4];
            client.read_exact(&mut pong).await.unwrap();
            assert_eq!(&pong, b"pong");
        }
    }

    /// An idle connection holds no receive or send buffer: the receive buffer
    /// is back in the thread's spare as soon as no partial record is left in
    /// it. (rustls's buffered connection keeps 4 KB for every connection.)
    #[tokio::test]
    async fn idle_connection_holds_no_buffers() {
        let pki = pki(TlsOptions::default());
        for version in VERSIONS {
            let (c, s) = tokio::io::duplex(1 << 16);
            let name = ServerName::try_from("localhost").unwrap();
            let mut client = rustls::ClientConnection::new(
                client_config(&pki, version, Some(&pki.client)),
                name,
            )
            .unwrap();
            let (mut c_rd, mut c_wr) = tokio::io::split(c);
            // The client, driven by hand, so that records can be cut anywhere.
            let handshake = async {
                let mut buf = vec![0; 1 << 16];
                while client.is_handshaking() {
                    let mut out = Vec::new();
                    while client.wants_write() {
                        client.write_tls(&mut out).unwrap();
                    }
                    c_wr.write_all(&out).await.unwrap();
                    if !client.is_handshaking() {
                        break;
                    }
                    let n = c_rd.read(&mut buf).await.unwrap();
                    client.read_tls(&mut &buf[..n]).unwrap();
                    client.process_new_packets().unwrap();
                }
                let mut out = Vec::new();
                while client.wants_write() {
                    client.write_tls(&mut out).unwrap();
                }
                c_wr.write_all(&out).await.unwrap();
            };
            let (server, ()) = tokio::join!(accept(pki.server.clone(), s), handshake);
            let mut server = server.unwrap();
            let mut buf = vec![0; 4096];
            assert!(try_read(&mut server, &mut buf).await.is_none());
            assert_eq!(server.buffered_capacity(), 0, "idle after the handshake");

            // One record, sent in two pieces: the first half is kept, then
            // the buffer goes back once the record is whole and read.
            std::io::Write::write_all(&mut client.writer(), b"hello").unwrap();
            let mut record = Vec::new();
            client.write_tls(&mut record).unwrap();
            let half = record.len() / 2;
            c_wr.write_all(&record[..half]).await.unwrap();
            assert!(try_read(&mut server, &mut buf).await.is_none());
            assert!(
                server.incoming.buf.len() >= MAX_RECORD,
                "a partial record is kept"
            );
            c_wr.write_all(&record[half..]).await.unwrap();
            let n = try_read(&mut server, &mut buf).await.unwrap().unwrap();
            assert_eq!(&buf[..n], b"hello");
            assert!(try_read(&mut server, &mut buf).await.is_none());
            assert_eq!(server.buffered_capacity(), 0, "idle after a read");
            assert_eq!(
                spare::IN.with(|c| {
                    let b = c.take();
                    let len = b.len();
                    c.set(b);
                    len
                }),
                MAX_RECORD,
                "the receive buffer went to the thread's spare"
            );

            // A write larger than one record leaves nothing behind once sent.
            server.write_all(&pattern(40_000, 3)).await.unwrap();
            server.flush().await.unwrap();
            assert_eq!(server.buffered_capacity(), 0, "idle after a write");
        }
    }

    /// A client whose certificate comes from an unknown CA is refused with an
    /// alert it receives (TLS 1.3: after its side of the handshake is done,
    /// on its first read; TLS 1.2: during the handshake).
    #[tokio::test]
    async fn unknown_ca_client_certificate_is_refused_with_an_alert() {
        let pki = pki(TlsOptions::default());
        for version in VERSIONS {
            let (c, s) = tokio::io::duplex(1 << 16);
            let connector =
                tokio_rustls::TlsConnector::from(client_config(&pki, version, Some(&pki.rogue)));
            let name = ServerName::try_from("localhost").unwrap();
            let client = async {
                let mut tls = connector.connect(name, c).await?;
                let mut buf = [0; 16];
                tls.read(&mut buf).await
            };
            let (server, client) = tokio::join!(accept(pki.server.clone(), s), client);
            let err = server.err().expect("the server refused the handshake");
            assert!(err.to_string().contains("certificate"), "{err}");
            let err = client.expect_err("the client was told");
            assert!(
                err.to_string().contains("received fatal alert: UnknownCA"),
                "{version:?}: {err}"
            );
        }
    }

    /// Without a client certificate: refused with an alert when certificates
    /// are required, accepted when they are optional.
    #[tokio::test]
    async fn client_without_certificate() {
        for optional in [false, true] {
            let pki = pki(TlsOptions {
                client_cert_optional: optional,
                ..TlsOptions::default()
            });
            let (c, s) = tokio::io::duplex(1 << 16);
            let connector = tokio_rustls::TlsConnector::from(client_config(
                &pki,
                &rustls::version::TLS13,
                None,
            ));
            let name = ServerName::try_from("localhost").unwrap();
            let client = async {
                let mut tls = connector.connect(name, c).await?;
                tls.write_all(b"hi").await?;
                tls.flush().await?;
                let mut buf = [0; 2];
                tls.read_exact(&mut buf).await?;
                Ok::<_, io::Error>(buf)
            };
            let server = async {
                let mut s = accept(pki.server.clone(), s).await?;
                assert!(s.peer_certificates().is_none());
                let mut buf = [0; 2];
                s.read_exact(&mut buf).await?;
                s.write_all(&buf).await?;
                s.flush().await?;
                Ok::<_, io::Error>(s)
            };
            let (server, client) = tokio::join!(server, client);
            if optional {
                server.unwrap();
                assert_eq!(&client.unwrap(), b"hi");
            } else {
                assert!(server.is_err());
                let err = client.unwrap_err();
                assert!(
                    err.to_string()
                        .contains("received fatal alert: CertificateRequired"),
                    "{err}"
                );
            }
        }
    }

    /// The end of the client's data: close_notify reads as end of stream, a
    /// bare end of the socket as an error, as with tokio-rustls.
    #[tokio::test]
    async fn end_of_stream_with_and_without_close_notify() {
        let pki = pki(TlsOptions::default());
        for version in VERSIONS {
            let (mut server, mut client) = pair(&pki, version, 1 << 16).await;
            client.write_all(b"last").await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"last");
            // Writing after the client closed its side still works.
            server.write_all(b"bye").await.unwrap();
            server.shutdown().await.unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"bye");

            let (mut server, client) = pair(&pki, version, 1 << 16).await;
            drop(client);
            let err = server.read(&mut [0; 8]).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        }
    }

    /// A client that does not read: writes stop being accepted (Pending) once
    /// the pipe is full, with no more than one write's records held.
    #[tokio::test]
    async fn writes_wait_for_a_full_socket() {
        let pki = pki(TlsOptions::default());
        let (mut server, mut client) = pair(&pki, &rustls::version::TLS13, 8192).await;
        let data = pattern(100_000, 4);
        let mut accepted = 0;
        let pending = poll_fn(|cx| loop {
            let from = accepted % data.len();
            match Pin::new(&mut server).poll_write(cx, &data[from..]) {
                Poll::Ready(Ok(n)) => {
                    accepted += n;
                    assert!(accepted < 10 * data.len(), "writes never blocked");
                }
                Poll::Ready(Err(e)) => panic!("{e}"),
                Poll::Pending => return Poll::Ready(()),
            }
        });
        pending.await;
        assert!(accepted > 0);
        assert!(
            server.out.end - server.out.start <= MAX_WRITE + 4 * 512,
            "{} bytes held",
            server.out.end - server.out.start
        );
        // Once the client reads, everything arrives in order.
        let read = async {
            let mut got = vec![0; accepted];
            client.read_exact(&mut got).await.unwrap();
            got
        };
        let (got, flushed) = tokio::join!(read, server.flush());
        flushed.unwrap();
        let expected: Vec<u8> = data.iter().copied().cycle().take(accepted).collect();
        assert!(got == expected);
    }

    /// MQTT-sized messages in lockstep, the server reading into a 4 KB stack
    /// buffer as `connection` does, over this stream and over tokio-rustls.
    /// Also the probe for comparing their cost per message under callgrind:
    /// `TLS_COST_MESSAGES=5000 valgrind --tool=callgrind
    /// --toggle-collect='*ProbeTlsStream*' <release test binary> --exact
    /// tls_stream::tests::small_messages_in_lockstep_over_both_implementations`
    /// (and `'*ProbeTokioRustls*'`).
    #[tokio::test]
    async fn small_messages_in_lockstep_over_both_implementations() {
        let n: usize = std::env::var("TLS_COST_MESSAGES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200);
        let pki = pki(TlsOptions::default());
        let connector = tokio_rustls::TlsConnector::from(client_config(
            &pki,
            &rustls::version::TLS13,
            Some(&pki.client),
        ));
        let client = |c: DuplexStream| {
            let connector = connector.clone();
            async move {
                let name = ServerName::try_from("localhost").unwrap();
                let mut tls = connector.connect(name, c).await.unwrap();
                let mut reply = [0; 60];
                for i in 0..n {
                    tls.write_all(&[i as u8; 100]).await.unwrap();
                    tls.flush().await.unwrap();
                    tls.read_exact(&mut reply).await.unwrap();
                    assert_eq!(reply, [i as u8 ^ 0xff; 60]);
                }
            }
        };

        let (c, s) = tokio::io::duplex(1 << 16);
        let server = async {
            let mut s = accept(pki.server.clone(), s).await.unwrap();
            per_message_tls_stream(&mut s, n).await;
        };
        tokio::join!(server, client(c));

        let (c, s) = tokio::io::duplex(1 << 16);
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server.clone());
        let server = async {
            let mut s = acceptor.accept(s).await.unwrap();
            per_message_tokio_rustls(&mut s, n).await;
        };
        tokio::join!(server, client(c));
    }

    async fn per_message_tls_stream(s: &mut TlsStream<DuplexStream>, n: usize) {
        per_message(&mut ProbeTlsStream(s), n).await
    }

    async fn per_message_tokio_rustls(
        s: &mut tokio_rustls::server::TlsStream<DuplexStream>,
        n: usize,
    ) {
        per_message(&mut ProbeTokioRustls(s), n).await
    }

    // Calls into the stream from functions that are never inlined, one type
    // per implementation, so that callgrind can count what happens inside
    // them (`--toggle-collect='*ProbeTlsStream*'`, `'*ProbeTokioRustls*'`).
    macro_rules! probe {
        ($name:ident) => {
            struct $name<S>(S);

            impl<S: AsyncRead + Unpin> AsyncRead for $name<S> {
                #[inline(never)]
                fn poll_read(
                    mut self: Pin<&mut Self>,
                    cx: &mut Context<'_>,
                    buf: &mut ReadBuf<'_>,
                ) -> Poll<io::Result<()>> {
                    Pin::new(&mut self.0).poll_read(cx, buf)
                }
            }

            impl<S: AsyncWrite + Unpin> AsyncWrite for $name<S> {
                #[inline(never)]
                fn poll_write(
                    mut self: Pin<&mut Self>,
                    cx: &mut Context<'_>,
                    buf: &[u8],
                ) -> Poll<io::Result<usize>> {
                    Pin::new(&mut self.0).poll_write(cx, buf)
                }

                #[inline(never)]
                fn poll_flush(
                    mut self: Pin<&mut Self>,
                    cx: &mut Context<'_>,
                ) -> Poll<io::Result<()>> {
                    Pin::new(&mut self.0).poll_flush(cx)
                }

                #[inline(never)]
                fn poll_shutdown(
                    mut self: Pin<&mut Self>,
                    cx: &mut Context<'_>,
                ) -> Poll<io::Result<()>> {
                    Pin::new(&mut self.0).poll_shutdown(cx)
                }
            }
        };
    }
    probe!(ProbeTlsStream);
    probe!(ProbeTokioRustls);

    async fn per_message<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, n: usize) {
        let mut buf = [0; 4096];
        for i in 0..n {
            let mut got = 0;
            while got < 100 {
                let k = s.read(&mut buf).await.unwrap();
                assert!(k > 0 && buf[..k].iter().all(|&b| b == i as u8));
                got += k;
            }
            s.write_all(&[i as u8 ^ 0xff; 60]).await.unwrap();
            s.flush().await.unwrap();
        }
    }
}
