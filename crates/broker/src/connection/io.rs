//! Reading without holding a buffer: the read future and the per-thread spare buffers.

use super::*;

/// Reads what the stream has into `buf`, through a buffer on the stack, so an
/// idle connection waiting to read holds no heap buffer: with a fleet of mostly
/// idle devices that is most of the broker's memory. A packet in progress that
/// left room in `buf` is read straight into it.
pub(super) struct ReadInto<'a, S> {
    pub(super) stream: &'a mut S,
    pub(super) buf: &'a mut BytesMut,
}

impl<'a, S> ReadInto<'a, S> {
    pub(super) fn new(stream: &'a mut S, buf: &'a mut BytesMut) -> Self {
        ReadInto { stream, buf }
    }
}

impl<S: AsyncRead + Unpin> Future for ReadInto<'_, S> {
    type Output = std::io::Result<usize>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        let this = &mut *self;
        if this.buf.capacity() - this.buf.len() >= 1024 {
            return read_spare(this.stream, this.buf, cx);
        }
        // Uninitialised: this runs on every poll, most of which find nothing
        // to read, and zeroing 4 KB each time showed in profiles.
        let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
        let mut rb = tokio::io::ReadBuf::uninit(&mut scratch);
        match Pin::new(&mut *this.stream).poll_read(cx, &mut rb) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                if n > 0 && this.buf.capacity() == 0 {
                    *this.buf = spare::take_in();
                }
                this.buf.extend_from_slice(rb.filled());
                Poll::Ready(Ok(n))
            }
        }
    }
}

/// One spare input and one spare output buffer per runtime thread. A
/// connection holds its buffers only while it has something in them (idle
/// connections are most of a fleet); between turns they wait here, so a busy
/// broker does not free and allocate (and regrow) two buffers per message.
pub(super) mod spare {
    use std::cell::Cell;

    use bytes::BytesMut;

    /// Larger buffers (after a big packet) are freed, not kept.
    const KEEP_MAX: usize = 16 * 1024;
    const OUT_INITIAL: usize = 1024;

    thread_local! {
        static IN: Cell<Option<BytesMut>> = const { Cell::new(None) };
        static OUT: Cell<Option<BytesMut>> = const { Cell::new(None) };
    }

    pub fn take_in() -> BytesMut {
        IN.with(|c| c.take()).unwrap_or_default()
    }

    pub fn take_out() -> BytesMut {
        OUT.with(|c| c.take())
            .unwrap_or_else(|| BytesMut::with_capacity(OUT_INITIAL))
    }

    pub fn put_in(buf: BytesMut) {
        keep(&IN, buf);
    }

    pub fn put_out(buf: BytesMut) {
        keep(&OUT, buf);
    }

    fn keep(slot: &'static std::thread::LocalKey<Cell<Option<BytesMut>>>, mut buf: BytesMut) {
        if buf.capacity() == 0 || buf.capacity() > KEEP_MAX {
            return;
        }
        buf.clear();
        // `try_with`: a connection dropped while its thread's locals are being
        // torn down just frees its buffer.
        let _ = slot.try_with(|c| c.set(Some(buf)));
    }
}

/// `read_buf` as a poll function: reads into the spare capacity of `buf`.
pub(super) fn read_spare<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<std::io::Result<usize>> {
    use std::task::Poll;
    let len = buf.len();
    buf.resize(buf.capacity(), 0);
    let mut rb = tokio::io::ReadBuf::new(&mut buf[len..]);
    let r = Pin::new(stream).poll_read(cx, &mut rb);
    let n = match &r {
        Poll::Ready(Ok(())) => rb.filled().len(),
        _ => 0,
    };
    buf.truncate(len + n);
    r.map(|r| r.map(|()| n))
}
