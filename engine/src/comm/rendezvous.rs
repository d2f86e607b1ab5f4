//! How ranks find each other. Rank 0 listens at the rendezvous address the launcher handed out;
//! every rank opens listeners of its own (TCP, and a Unix-domain socket in the abstract
//! namespace), tells rank 0 where they are and which machine it runs on, and gets back the table
//! of all ranks. Then each rank dials every lower rank and accepts every higher one, which gives
//! one connection per pair: a Unix-domain socket between ranks on the same machine (same boot id,
//! and the peer's socket reachable: a rank in another network namespace falls back), TCP
//! otherwise. Each wait is bounded by the timeout, and a rank that never shows up is named.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::transport::{peer_error, Stream};
use crate::{Error, Result};

/// Which connections the ranks use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Unix-domain sockets between ranks on the same machine, TCP between machines.
    Auto,
    /// TCP between every pair (to measure TCP itself, or where Unix sockets are unwanted).
    Tcp,
}

impl Transport {
    /// `GANTRY_COMM_TRANSPORT=tcp` forces TCP; anything else (or nothing) is `Auto`.
    pub fn from_env() -> Self {
        match std::env::var("GANTRY_COMM_TRANSPORT").as_deref() {
            Ok("tcp") => Transport::Tcp,
            _ => Transport::Auto,
        }
    }
}

/// This machine's identity for "same host": the kernel's boot id (containers on one host share
/// it; their separate network namespaces make the Unix connect fail, and TCP is used instead).
fn host_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// One rank's entry in the table: `tcp address|host id|abstract socket name`.
fn entry(tcp: &str, unix: Option<&str>) -> String {
    format!("{tcp}|{}|{}", host_id(), unix.unwrap_or(""))
}

fn parse_entry(e: &str) -> (&str, &str, &str) {
    let mut it = e.splitn(3, '|');
    (it.next().unwrap_or(""), it.next().unwrap_or(""), it.next().unwrap_or(""))
}

/// A Unix listener in the abstract namespace (nothing on the filesystem to clean up). A count
/// keeps the name unique within this process (ranks run as threads, as in the tests, share the
/// pid and may read the same clock); the pid and the clock set it apart from other processes.
fn unix_listener(rank: usize) -> Option<(UnixListener, String)> {
    static LISTENERS: AtomicU64 = AtomicU64::new(0);
    let n = LISTENERS.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let name = format!("gantry-comm-{}-{rank}-{n}-{nanos}", std::process::id());
    let addr = UnixAddr::from_abstract_name(name.as_bytes()).ok()?;
    let l = UnixListener::bind_addr(&addr).ok()?;
    l.set_nonblocking(true).ok()?;
    Some((l, name))
}

const MAGIC: u32 = 0x4741_4e54; // "GANT"

fn rv_error(message: impl Into<String>) -> Error {
    Error::Comm { rank: None, message: format!("rendezvous: {}", message.into()) }
}

fn write_u64s(s: &mut impl Write, vals: &[u64]) -> std::io::Result<()> {
    let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    s.write_all(&bytes)
}

fn read_u64s(s: &mut impl Read, n: usize) -> std::io::Result<Vec<u64>> {
    let mut buf = vec![0u8; 8 * n];
    s.read_exact(&mut buf)?;
    Ok(buf.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect())
}

fn write_str(s: &mut impl Write, text: &str) -> std::io::Result<()> {
    write_u64s(s, &[text.len() as u64])?;
    s.write_all(text.as_bytes())
}

fn read_str(s: &mut impl Read) -> std::io::Result<String> {
    let n = read_u64s(s, 1)?[0] as usize;
    if n > 4096 {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "address too long"));
    }
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf)?;
    String::from_utf8(buf).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

fn accept_until(l: &TcpListener, deadline: Instant) -> std::io::Result<Option<TcpStream>> {
    l.set_nonblocking(true)?;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(Some(s));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    }
}

fn connect_until(addr: &str, deadline: Instant) -> Result<TcpStream> {
    loop {
        let last = match addr.to_socket_addrs() {
            Ok(mut addrs) => match addrs.next() {
                Some(a) => match TcpStream::connect_timeout(&a, Duration::from_secs(1)) {
                    Ok(s) => return Ok(s),
                    Err(e) => e.to_string(),
                },
                None => format!("{addr} resolves to no address"),
            },
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(rv_error(format!("could not reach {addr}: {last}")));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Connects `rank` of `world` to all others; returns one stream per peer (`None` at `rank`).
pub(crate) fn connect_mesh(
    rank: usize,
    world: usize,
    rendezvous: &str,
    timeout: Duration,
    transport: Transport,
) -> Result<Vec<Option<Stream>>> {
    if rank >= world {
        return Err(rv_error(format!("rank {rank} is outside a world of {world}")));
    }
    let deadline = Instant::now() + timeout;
    let io = |what: &str| {
        let what = what.to_string();
        move |e: std::io::Error| rv_error(format!("{what}: {e}"))
    };
    // Everyone's own listener, on the interface that reaches rank 0.
    let (table, own) = if rank == 0 {
        let server = TcpListener::bind(rendezvous).map_err(io(&format!("listening on {rendezvous}")))?;
        let own = TcpListener::bind((server.local_addr().map_err(io("local address"))?.ip(), 0)).map_err(io("listening"))?;
        let unix = (transport == Transport::Auto).then(|| unix_listener(0)).flatten();
        let mut table = vec![String::new(); world];
        table[0] = entry(&own.local_addr().map_err(io("local address"))?.to_string(), unix.as_ref().map(|u| u.1.as_str()));
        let mut joined: Vec<TcpStream> = Vec::new();
        while joined.len() + 1 < world {
            let Some(mut s) = accept_until(&server, deadline).map_err(io("accepting"))? else {
                let missing: Vec<String> = (1..world).filter(|r| table[*r].is_empty()).map(|r| r.to_string()).collect();
                return Err(rv_error(format!("ranks {} did not join within {timeout:?}", missing.join(", "))));
            };
            // Anything can connect to the port (a port scanner, a stale worker of an earlier
            // attempt): a connection that does not greet as a new rank of this world within the
            // time left is dropped, and rank 0 goes on waiting for the real ones.
            s.set_read_timeout(Some(hello_wait(deadline))).map_err(io("socket"))?;
            let hello = read_u64s(&mut s, 3).and_then(|h| Ok((h, read_str(&mut s)?)));
            match hello {
                Ok((h, addr)) => {
                    let (magic, r, w) = (h[0] as u32, h[1] as usize, h[2] as usize);
                    if magic != MAGIC || w != world || r == 0 || r >= world || !table[r].is_empty() {
                        tracing::warn!("rendezvous: ignored a connection that said rank {r} of {w} (expected a new rank of 1..{world})");
                        continue;
                    }
                    table[r] = addr;
                    joined.push(s);
                }
                Err(e) => tracing::warn!("rendezvous: ignored a connection that sent no hello: {e}"),
            }
        }
        for s in &mut joined {
            for a in &table {
                write_str(s, a).map_err(io("sending the table"))?;
            }
        }
        (table, (own, unix))
    } else {
        let mut s = connect_until(rendezvous, deadline)?;
        s.set_read_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)))).map_err(io("socket"))?;
        let ip = s.local_addr().map_err(io("local address"))?.ip();
        let own = TcpListener::bind((ip, 0)).map_err(io("listening"))?;
        let addr: SocketAddr = own.local_addr().map_err(io("local address"))?;
        let unix = (transport == Transport::Auto).then(|| unix_listener(rank)).flatten();
        write_u64s(&mut s, &[MAGIC as u64, rank as u64, world as u64]).map_err(io("sending the hello"))?;
        write_str(&mut s, &entry(&addr.to_string(), unix.as_ref().map(|u| u.1.as_str()))).map_err(io("sending the hello"))?;
        let table = (0..world)
            .map(|_| read_str(&mut s))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| rv_error(format!("rank 0 did not send the address table within {timeout:?}: {e} (did every rank start?)")))?;
        (table, (own, unix))
    };
    mesh(rank, world, table, own, deadline, timeout, transport)
}

/// Larger kernel socket buffers: fewer wake-ups per megabyte on the ring's large messages. (The
/// kernel caps them at net.core.[rw]mem_max; failure only costs speed.)
fn set_buffers(s: &Stream, bytes: i32) {
    use std::os::fd::{AsFd, AsRawFd};
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: `s` owns a valid socket descriptor for the duration of the call, and the option
        // value is a live i32 whose size is passed alongside.
        unsafe {
            libc::setsockopt(
                s.as_fd().as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&bytes as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            );
        }
    }
}

/// Accepts one connection on either listener before the deadline.
fn accept_any(tcp: &TcpListener, unix: Option<&UnixListener>, deadline: Instant) -> std::io::Result<Option<Stream>> {
    tcp.set_nonblocking(true)?;
    loop {
        match tcp.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(Some(Stream::Tcp(s)));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        if let Some(u) = unix {
            match u.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false)?;
                    return Ok(Some(Stream::Unix(s)));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Dials a lower rank: its Unix socket when it runs on this machine and the socket answers, TCP
/// otherwise (always TCP when this rank was asked for TCP, whatever the peer offers).
fn dial(entry: &str, deadline: Instant, transport: Transport) -> Result<Stream> {
    let (tcp, host, unix) = parse_entry(entry);
    if transport == Transport::Auto && !unix.is_empty() && !host.is_empty() && host == host_id() {
        if let Ok(addr) = UnixAddr::from_abstract_name(unix.as_bytes()) {
            if let Ok(s) = UnixStream::connect_addr(&addr) {
                return Ok(Stream::Unix(s));
            }
        }
    }
    Ok(Stream::Tcp(connect_until(tcp, deadline)?))
}

/// How long to wait for a new connection's first message: a rank sends it as soon as it has
/// connected, so a connection silent for seconds is not one (a port scanner that holds it open),
/// and must not hold the rendezvous up until its deadline.
fn hello_wait(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now()).clamp(Duration::from_millis(1), Duration::from_secs(5))
}

fn mesh(
    rank: usize,
    world: usize,
    table: Vec<String>,
    (own, unix): (TcpListener, Option<(UnixListener, String)>),
    deadline: Instant,
    timeout: Duration,
    transport: Transport,
) -> Result<Vec<Option<Stream>>> {
    let mut streams: Vec<Option<Stream>> = (0..world).map(|_| None).collect();
    for (peer, addr) in table.iter().enumerate().take(rank) {
        let s = dial(addr, deadline, transport)?;
        write_u64s(&mut &s, &[MAGIC as u64, rank as u64]).map_err(|e| peer_error(peer, format!("greeting: {e}")))?;
        streams[peer] = Some(s);
    }
    while streams[rank + 1..].iter().any(Option::is_none) {
        let Some(s) = accept_any(&own, unix.as_ref().map(|u| &u.0), deadline).map_err(|e| rv_error(format!("accepting: {e}")))? else {
            let missing: Vec<String> = (rank + 1..world).filter(|r| streams[*r].is_none()).map(|r| r.to_string()).collect();
            return Err(rv_error(format!("ranks {} did not connect within {timeout:?}", missing.join(", "))));
        };
        // As at the rendezvous: a connection that does not greet as an expected rank is dropped.
        s.set_read_timeout(Some(hello_wait(deadline))).map_err(|e| rv_error(e.to_string()))?;
        let peer = match read_u64s(&mut &s, 2) {
            Ok(h) if h[0] as u32 == MAGIC && (h[1] as usize) > rank && (h[1] as usize) < world && streams[h[1] as usize].is_none() => {
                h[1] as usize
            }
            Ok(h) => {
                tracing::warn!("rendezvous: ignored a greeting from rank {} (expected one of {}..{world})", h[1], rank + 1);
                continue;
            }
            Err(e) => {
                tracing::warn!("rendezvous: ignored a connection that sent no greeting: {e}");
                continue;
            }
        };
        streams[peer] = Some(s);
    }
    for s in streams.iter().flatten() {
        if let Stream::Tcp(t) = s {
            t.set_nodelay(true).map_err(|e| rv_error(e.to_string()))?;
        }
        set_buffers(s, 4 << 20);
        s.set_read_timeout(None).map_err(|e| rv_error(e.to_string()))?;
        s.set_nonblocking(true).map_err(|e| rv_error(e.to_string()))?;
    }
    Ok(streams)
}
