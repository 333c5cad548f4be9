//! When Envoy's last connection on a port really ended, seen by the bench itself: the kernel's
//! sock_diag destroy group announces each TCP socket of the namespace as it is freed (root only).
//! A client's `close()` returns before Envoy has read it and closed its side; the drain can end
//! only after that, so "the last close" of a drain is this moment, not the client's.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

const SKNLGRP_INET_TCP_DESTROY: libc::c_int = 1;
/// `struct nlmsghdr` (16 bytes), then `struct inet_diag_msg`: four one-byte fields, then the
/// socket id, whose first fields are the source and destination ports (big endian).
const SPORT: usize = 16 + 4;
const DPORT: usize = SPORT + 2;

pub struct Ends {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<Seen>,
}

/// What the watch saw: Envoy's connection ends on the port, the last one's wall-clock time, and
/// whether the kernel dropped messages (then the last one may be missing).
#[derive(Debug, Default)]
pub struct Seen {
    pub count: u64,
    pub last: Option<SystemTime>,
    pub lost: bool,
}

impl Ends {
    /// Watches the ends of the connections accepted on `port` (not the listener's own socket).
    pub fn watch(port: u16) -> Ends {
        let fd = subscribe();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let count = Arc::new(AtomicU64::new(0));
        let counted = count.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = Seen::default();
            let mut buffer = vec![0u8; 1 << 16];
            while !stopped.load(Ordering::Relaxed) {
                // SAFETY: recv(2) writes at most buffer.len() bytes into the buffer.
                let read = unsafe { libc::recv(fd, buffer.as_mut_ptr().cast(), buffer.len(), 0) };
                if read < 0 {
                    let error = std::io::Error::last_os_error();
                    seen.lost |= error.raw_os_error() == Some(libc::ENOBUFS);
                    continue; // the receive timeout, to look at `stopped`
                }
                let now = SystemTime::now();
                let ended = ends_on(&buffer[..read as usize], port);
                if ended > 0 {
                    seen.count += ended;
                    seen.last = Some(now);
                    counted.store(seen.count, Ordering::Relaxed);
                }
            }
            // SAFETY: the descriptor is this thread's own and is not used after.
            unsafe { libc::close(fd) };
            seen
        });
        Ends { stop, count, thread }
    }

    /// The ends seen so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn stop(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the ends watch")
    }
}

/// A netlink socket in the TCP destroy group, with a large buffer and a short receive timeout.
fn subscribe() -> libc::c_int {
    // SAFETY: plain socket calls on a descriptor made here; each reads a live local for its length.
    unsafe {
        let fd = libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_SOCK_DIAG);
        assert!(fd >= 0, "sock_diag socket: {}", std::io::Error::last_os_error());
        let buffer: libc::c_int = 64 << 20;
        let int = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, (&buffer as *const libc::c_int).cast(), int);
        let timeout = libc::timeval { tv_sec: 0, tv_usec: Duration::from_millis(50).as_micros() as libc::suseconds_t };
        let size = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&timeout as *const libc::timeval).cast(), size);
        let mut address: libc::sockaddr_nl = std::mem::zeroed();
        address.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        let length = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        assert!(libc::bind(fd, (&address as *const libc::sockaddr_nl).cast(), length) == 0, "bind sock_diag");
        let group = SKNLGRP_INET_TCP_DESTROY;
        let joined = libc::setsockopt(
            fd,
            libc::SOL_NETLINK,
            libc::NETLINK_ADD_MEMBERSHIP,
            (&group as *const libc::c_int).cast(),
            int,
        );
        assert!(joined == 0, "the TCP destroy group (root is needed): {}", std::io::Error::last_os_error());
        fd
    }
}

/// The messages in `datagram` for a connection (a peer port) accepted on `port`.
fn ends_on(datagram: &[u8], port: u16) -> u64 {
    let (mut count, mut rest) = (0, datagram);
    while rest.len() >= DPORT + 2 {
        let length = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if length < DPORT + 2 || length > rest.len() {
            break;
        }
        let sport = u16::from_be_bytes([rest[SPORT], rest[SPORT + 1]]);
        let dport = u16::from_be_bytes([rest[DPORT], rest[DPORT + 1]]);
        count += u64::from(sport == port && dport != 0);
        rest = &rest[length.next_multiple_of(4).min(rest.len())..];
    }
    count
}

/// A wall-clock time as seconds of the UTC day, as sesame's log lines give theirs.
pub fn time_of_day(at: SystemTime) -> f64 {
    at.duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64().rem_euclid(86_400.0))
}
