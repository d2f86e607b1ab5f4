//! Byte transport between ranks: one connection per pair, driven without threads or copies. Ranks
//! on the same machine are connected by a Unix-domain socket (two to three times the throughput
//! of loopback TCP: no TCP/IP stack in the way), ranks on different machines by TCP.
//!
//! Every collective step is an *exchange*: send some bytes to one peer while receiving some from
//! another (often the same). The sockets are non-blocking and `poll` drives both directions at
//! once straight from and into the caller's buffers, so a ring step moves data both ways at full
//! speed with no staging copy. Every wait is bounded: a peer that sends nothing for the timeout,
//! or closes its connection, produces an error naming its rank.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::{Error, Result};

pub(crate) fn peer_error(rank: usize, message: impl Into<String>) -> Error {
    Error::Comm { rank: Some(rank), message: message.into() }
}

/// A connection to one peer.
#[derive(Debug)]
pub(crate) enum Stream {
    Tcp(TcpStream),
    /// Same machine: a Unix-domain socket.
    Unix(UnixStream),
}

impl Stream {
    pub fn kind(&self) -> &'static str {
        match self {
            Stream::Tcp(_) => "tcp",
            Stream::Unix(_) => "unix",
        }
    }

    pub fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nonblocking(on),
            Stream::Unix(s) => s.set_nonblocking(on),
        }
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).read(buf),
            Stream::Unix(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).write(buf),
            Stream::Unix(s) => (&*s).write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The connections of one rank to every other (`None` at its own index).
#[derive(Debug)]
pub(crate) struct Links {
    pub rank: usize,
    pub streams: Vec<Option<Stream>>,
    pub timeout: Duration,
    /// Bytes moved, for the communication-time metrics.
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// One direction of an exchange: a peer and the buffers to move, in order.
pub(crate) struct Outgoing<'a> {
    pub peer: usize,
    pub bufs: Vec<&'a [u8]>,
}

/// Called with the bytes received so far, as they arrive.
pub(crate) type Progress<'p> = &'p mut dyn FnMut(&[u8]);

pub(crate) struct Incoming<'a, 'p> {
    pub peer: usize,
    pub buf: &'a mut [u8],
    /// Called with the bytes received so far, as they arrive (for reducing while receiving).
    pub progress: Option<Progress<'p>>,
}

impl Links {
    fn stream(&self, peer: usize) -> Result<&Stream> {
        self.streams
            .get(peer)
            .and_then(Option::as_ref)
            .ok_or_else(|| peer_error(peer, format!("rank {} has no connection to it", self.rank)))
    }

    /// Sends and receives at the same time until both are complete.
    pub fn exchange(&mut self, send: Option<Outgoing<'_>>, recv: Option<Incoming<'_, '_>>) -> Result<()> {
        let (mut send_peer, mut bufs) = match send {
            Some(s) => (Some(s.peer), s.bufs),
            None => (None, Vec::new()),
        };
        bufs.retain(|b| !b.is_empty());
        if bufs.is_empty() {
            send_peer = None;
        }
        let (recv_peer, recv_buf, mut progress) = match recv {
            Some(r) if !r.buf.is_empty() => (Some(r.peer), r.buf, r.progress),
            _ => (None, &mut [][..], None),
        };
        let (mut buf_i, mut buf_off, mut got) = (0usize, 0usize, 0usize);
        let mut last_activity = Instant::now();
        while send_peer.is_some() || (recv_peer.is_some() && got < recv_buf.len()) {
            let want_send = send_peer;
            let want_recv = recv_peer.filter(|_| got < recv_buf.len());
            let (readable, writable) = self.wait(want_send, want_recv, last_activity)?;
            if let (Some(peer), true) = (want_send, writable) {
                let mut stream = self.stream(peer)?;
                match stream.write(&bufs[buf_i][buf_off..]) {
                    Ok(0) => return Err(peer_error(peer, "closed its connection")),
                    Ok(n) => {
                        self.bytes_sent += n as u64;
                        last_activity = Instant::now();
                        buf_off += n;
                        if buf_off == bufs[buf_i].len() {
                            buf_i += 1;
                            buf_off = 0;
                            if buf_i == bufs.len() {
                                send_peer = None;
                            }
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(peer_error(peer, format!("sending failed: {e} (the process ended?)"))),
                }
            }
            if let (Some(peer), true) = (want_recv, readable) {
                let mut stream = self.stream(peer)?;
                match stream.read(&mut recv_buf[got..]) {
                    Ok(0) => return Err(peer_error(peer, "closed its connection (the process ended?)")),
                    Ok(n) => {
                        self.bytes_received += n as u64;
                        last_activity = Instant::now();
                        got += n;
                        if let Some(p) = progress.as_mut() {
                            p(&recv_buf[..got]);
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(peer_error(peer, format!("receiving failed: {e} (the process ended?)"))),
                }
            }
        }
        Ok(())
    }

    /// Waits until the send side can write or the receive side can read; `(readable, writable)`.
    fn wait(&self, send: Option<usize>, recv: Option<usize>, since: Instant) -> Result<(bool, bool)> {
        loop {
            let left = self.timeout.saturating_sub(since.elapsed());
            if left.is_zero() {
                let peer = recv.or(send).unwrap_or(self.rank);
                let what = if recv.is_some() { "sent nothing" } else { "took nothing" };
                return Err(peer_error(peer, format!("{what} for {:?} (dead or stuck?)", self.timeout)));
            }
            let mut fds = Vec::with_capacity(2);
            let same = send.is_some() && send == recv;
            if let Some(p) = recv {
                let flags = if same { PollFlags::POLLIN | PollFlags::POLLOUT } else { PollFlags::POLLIN };
                fds.push((p, PollFd::new(self.stream(p)?.as_fd(), flags)));
            }
            if let Some(p) = send.filter(|_| !same) {
                fds.push((p, PollFd::new(self.stream(p)?.as_fd(), PollFlags::POLLOUT)));
            }
            let mut raw: Vec<PollFd<'_>> = fds.iter().map(|(_, f)| *f).collect();
            let ms = PollTimeout::try_from(left.min(Duration::from_millis(500))).unwrap_or(PollTimeout::MAX);
            match poll(&mut raw, ms) {
                Ok(0) => continue,
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(peer_error(self.rank, format!("poll failed: {e}"))),
            }
            let (mut readable, mut writable) = (false, false);
            for ((peer, _), fd) in fds.iter().zip(&raw) {
                let ev = fd.revents().unwrap_or(PollFlags::empty());
                // An error or hang-up shows up as readable/writable so the read or write reports it.
                let bad = ev.intersects(PollFlags::POLLERR | PollFlags::POLLHUP | PollFlags::POLLNVAL);
                if Some(*peer) == recv && (ev.contains(PollFlags::POLLIN) || bad) {
                    readable = true;
                }
                if Some(*peer) == send && (ev.contains(PollFlags::POLLOUT) || bad) {
                    writable = true;
                }
            }
            if readable || writable {
                return Ok((readable, writable));
            }
        }
    }
}
