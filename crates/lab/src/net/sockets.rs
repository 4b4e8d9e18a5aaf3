//! Sockets inside lab namespaces, without spawning processes.
//!
//! A socket belongs to the network namespace of the thread that created it, for its whole
//! life. So a short-lived thread enters the namespace (`setns`), creates the socket and hands it
//! back; the caller then uses it from any thread, including async runtimes (after
//! `set_nonblocking(true)` and `from_std`).

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Where `ip netns add` puts the handle of a named namespace.
const NETNS_DIR: &str = "/run/netns";
/// Longest wait for the throughput sender to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest stall of a single read or write during the throughput measurement.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest measurement `tcp_throughput` accepts, so a benchmark cannot hang for long.
const MAX_THROUGHPUT_DURATION: Duration = Duration::from_secs(60);
/// Size of each write and read in the throughput measurement.
const CHUNK: usize = 256 * 1024;

/// The handle path of namespace `ns`, refusing names that could escape `/run/netns`.
fn netns_path(ns: &str) -> io::Result<PathBuf> {
    if ns.is_empty() || ns.contains('/') || ns == "." || ns == ".." {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid network namespace name {ns:?}"),
        ));
    }
    Ok(PathBuf::from(NETNS_DIR).join(ns))
}

/// Makes the calling thread enter the network namespace at `path`.
fn enter_netns(ns: &str, path: &PathBuf) -> io::Result<()> {
    let file = File::open(path).map_err(|e| {
        io::Error::new(e.kind(), format!("cannot open network namespace {ns}: {e}"))
    })?;
    // SAFETY: the fd is valid for the duration of the call; setns changes only this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("cannot enter network namespace {ns}: {e}"),
        ));
    }
    Ok(())
}

/// Runs `f` on a fresh OS thread that has entered network namespace `ns`, and returns its
/// result. Sockets created by `f` live in `ns`; the calling thread's namespace is untouched.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let path = netns_path(ns)?;
    let name = ns.to_string();
    let handle = std::thread::Builder::new()
        .name("ferry-netns".to_string())
        .spawn(move || {
            enter_netns(&name, &path)?;
            f()
        })?;
    handle
        .join()
        .map_err(|_| io::Error::other(format!("closure run in network namespace {ns} panicked")))?
}

/// Runs `f` on a fresh, detached OS thread that has entered network namespace `ns` (for
/// work that outlives the call, such as a watch). Fails only when the thread cannot start;
/// a namespace it cannot enter ends the thread without running `f`.
pub(super) fn in_netns_background(ns: &str, f: impl FnOnce() + Send + 'static) -> io::Result<()> {
    let path = netns_path(ns)?;
    let name = ns.to_string();
    std::thread::Builder::new()
        .name("ferry-netns".to_string())
        .spawn(move || {
            if enter_netns(&name, &path).is_ok() {
                f();
            }
        })?;
    Ok(())
}

/// Connects to `addr` from namespace `ns`, giving up after `timeout`.
pub fn tcp_connect_in(ns: &str, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    in_netns(ns, move || TcpStream::connect_timeout(&addr, timeout))
}

/// Binds a TCP listener on `addr` in namespace `ns` (port 0 picks a free port).
pub fn tcp_listen_in(ns: &str, addr: SocketAddr) -> io::Result<TcpListener> {
    in_netns(ns, move || TcpListener::bind(addr))
}

/// Binds a UDP socket on `addr` in namespace `ns` (port 0 picks a free port).
pub fn udp_bind_in(ns: &str, addr: SocketAddr) -> io::Result<UdpSocket> {
    in_netns(ns, move || UdpSocket::bind(addr))
}

/// Measures raw TCP throughput in bytes per second from namespace `ns_from` to `to_addr` in
/// namespace `ns_to`, sending for `duration` (at most 60 s).
///
/// Benchmarks compare migration speed with this figure: it is what the lab's veths and bridges
/// can carry on this machine. A receiver thread counts bytes from accept to end of stream; the
/// sender writes for `duration`. Every wait is bounded, so the call returns within about
/// `duration` plus a few seconds even if the path is broken.
/// `n` distinct loopback ports that were free a moment ago, for processes that must be
/// configured with a fixed port (they bind it themselves later, and again after a restart).
/// All are held at once, so they differ. They are taken below the kernel's ephemeral range:
/// a port in it can be handed to any outgoing connection the moment its daemon stops, and
/// the daemon's restart then fails with "address in use".
pub fn free_local_ports(n: usize) -> io::Result<Vec<u16>> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_low.max(10_001));
    // Start somewhere different per process and call, so parallel tests rarely meet.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        ^ std::process::id().wrapping_mul(2_654_435_761);
    let span = u32::from(high - low);
    let mut listeners = Vec::with_capacity(n);
    for i in 0..span {
        if listeners.len() == n {
            break;
        }
        let port = low + ((seed.wrapping_add(i.wrapping_mul(7919))) % span) as u16;
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            listeners.push(l);
        }
    }
    if listeners.len() < n {
        return Err(io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            format!("no {n} free loopback ports between {low} and {high}"),
        ));
    }
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

pub fn tcp_throughput(
    ns_from: &str,
    ns_to: &str,
    to_addr: Ipv4Addr,
    duration: Duration,
) -> io::Result<f64> {
    let duration = duration.min(MAX_THROUGHPUT_DURATION);
    let listener = tcp_listen_in(ns_to, SocketAddr::from((to_addr, 0)))?;
    let addr = listener.local_addr()?;
    let receiver = std::thread::Builder::new()
        .name("ferry-tput-rx".to_string())
        .spawn(move || receive_all(listener))?;
    let sent = send_for(ns_from, addr, duration);
    let received = receiver
        .join()
        .map_err(|_| io::Error::other("throughput receiver thread panicked"))?;
    sent?;
    let (bytes, elapsed) = received?;
    if bytes == 0 || elapsed.is_zero() {
        return Err(io::Error::other(format!(
            "no data arrived at {addr} in network namespace {ns_to}"
        )));
    }
    Ok(bytes as f64 / elapsed.as_secs_f64())
}

/// Connects from `ns` to `addr` and writes for `duration`, then closes the sending side.
fn send_for(ns: &str, addr: SocketAddr, duration: Duration) -> io::Result<u64> {
    let mut stream = tcp_connect_in(ns, addr, CONNECT_TIMEOUT)?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let buf = vec![0x5au8; CHUNK];
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < duration {
        stream.write_all(&buf)?;
        sent += CHUNK as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    Ok(sent)
}

/// Accepts one connection (waiting at most a little longer than the sender's connect timeout)
/// and reads it to the end; returns the byte count and the time from accept to end of stream.
fn receive_all(listener: TcpListener) -> io::Result<(u64, Duration)> {
    let mut stream = accept_within(&listener, CONNECT_TIMEOUT + Duration::from_secs(1))?;
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let start = Instant::now();
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buf)? {
            0 => return Ok((total, start.elapsed())),
            n => total += n as u64,
        }
    }
}

/// Accepts one connection on `listener`, or fails with `TimedOut` after `timeout`.
fn accept_within(listener: &TcpListener, timeout: Duration) -> io::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((stream, _)) => return Ok(stream),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no connection arrived for the throughput measurement",
                    ));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn free_ports_differ_and_stay_out_of_the_ephemeral_range() {
        let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let ports = free_local_ports(5).unwrap();
        let mut unique = ports.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 5, "{ports:?}");
        assert!(ports.iter().all(|p| (10_000..low).contains(p)), "{ports:?}");
        // Free again once returned: a daemon can bind it, and bind it again after a restart.
        for p in ports {
            drop(std::net::TcpListener::bind(("127.0.0.1", p)).unwrap());
            std::net::TcpListener::bind(("127.0.0.1", p)).unwrap();
        }
    }

    use super::*;

    #[test]
    fn rejects_path_like_namespace_names() {
        assert!(netns_path("../etc").is_err());
        assert!(netns_path("").is_err());
        assert!(netns_path("ferry-x-sw").is_ok());
    }

    #[test]
    fn missing_namespace_is_an_error() {
        let err = in_netns("ferry-does-not-exist-sw", || Ok(())).unwrap_err();
        assert!(err.to_string().contains("ferry-does-not-exist-sw"));
    }
}
