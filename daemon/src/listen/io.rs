//! A connection's byte stream, watched: when it last moved (for the idle timeout), and closed with
//! a linger (for the answer to a body the daemon did not read).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How long, and how much, a closing connection reads and drops of what its client still sends.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: u64 = 1 << 30;

/// When a connection last moved, shared between the stream and its watchdog.
#[derive(Clone)]
pub struct Activity {
    start: Instant,
    /// Milliseconds after `start`.
    last: Arc<AtomicU64>,
    read_any: Arc<AtomicBool>,
}

impl Activity {
    fn touch(&self) {
        self.last.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle(&self) -> Duration {
        self.start.elapsed().saturating_sub(Duration::from_millis(self.last.load(Ordering::Relaxed)))
    }

    /// Returns once nothing has moved for `idle` (`first_byte` until the client sent anything).
    pub async fn stalled(&self, first_byte: Duration, idle: Duration) {
        loop {
            let limit = if self.read_any.load(Ordering::Relaxed) { idle } else { first_byte };
            let quiet = self.idle();
            if quiet >= limit {
                return;
            }
            tokio::time::sleep(limit - quiet + Duration::from_millis(10)).await;
        }
    }
}

/// A stream whose reads and writes mark its `Activity`, and whose shutdown lingers: after its own
/// side is closed it reads (and drops) what the client still sends, for up to `LINGER`. Closing a
/// socket with unread data makes the kernel send a reset, which can destroy an answer the client
/// has not read yet (a 413 for a body still being sent, say).
pub struct Tracked<T> {
    inner: T,
    activity: Activity,
    linger: Option<(Pin<Box<tokio::time::Sleep>>, u64)>,
}

impl<T> Tracked<T> {
    pub fn new(inner: T) -> Tracked<T> {
        let activity = Activity { start: Instant::now(), last: Arc::new(AtomicU64::new(0)), read_any: Arc::new(AtomicBool::new(false)) };
        Tracked { inner, activity, linger: None }
    }

    pub fn activity(&self) -> Activity {
        self.activity.clone()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.read_any.store(true, Ordering::Relaxed);
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.linger.is_none() {
            ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
            this.linger = Some((Box::pin(tokio::time::sleep(LINGER)), 0));
        }
        let Some((deadline, drained)) = &mut this.linger else { unreachable!() };
        let mut scratch = [0u8; 16 << 10];
        loop {
            if *drained >= LINGER_BYTES || deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => *drained += buf.filled().len() as u64,
                // The client is gone: nothing left to protect.
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
