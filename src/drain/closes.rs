//! Envoy's downstream connections as the kernel sees them end: the sock_diag netlink group
//! `SKNLGRP_INET{,6}_TCP_DESTROY` announces every TCP socket of the network namespace as it is
//! freed. A drain counts those whose local port is one of Envoy's listeners' and reads Envoy's
//! count again only when enough of them have ended for it to have reached the threshold, instead
//! of asking Envoy's admin at a steady pace: the last connection's end is seen within a round trip,
//! at a fraction of the admin requests.
//!
//! A socket Envoy closes is freed once the peer has acknowledged the close (a round trip), or at
//! once after a reset; a connection whose socket lingers (a peer that never answers) is caught by
//! the drain's backstop poll.

use std::collections::{HashSet, VecDeque};
use std::io::{ErrorKind, Read};
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;

/// Netlink multicast groups of `linux/sock_diag.h`.
const SKNLGRP_INET_TCP_DESTROY: libc::c_int = 1;
const SKNLGRP_INET6_TCP_DESTROY: libc::c_int = 3;
/// `struct nlmsghdr` is 16 bytes; `struct inet_diag_msg` starts with family, state, timer,
/// retrans (one byte each), then the socket id, whose first fields are the source and destination
/// ports (big endian).
const NLMSG_HEADER: usize = 16;
const SPORT_OFFSET: usize = NLMSG_HEADER + 4;
const DPORT_OFFSET: usize = SPORT_OFFSET + 2;
const NLMSG_ERROR: u16 = 2;

/// The receive buffer asked for (the kernel doubles it). The kernel charges each connection-end
/// message at the size of the buffer it was built in, between 1 and 2 KiB here (the test below
/// holds 2,000 in 4 MiB, not in 2), so its default of 208 KiB held about a hundred for a reader
/// that fell behind; this holds 16,000 or more. Memory is taken only while messages wait to be read,
/// and the socket lives for the length of a drain. Without CAP_NET_ADMIN the kernel caps it at
/// `net.core.rmem_max`; what is lost then is made up for by reading Envoy's count (`ended`).
const RECEIVE_BUFFER: libc::c_int = 16 << 20;

/// Why a wait for ends is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Enough,
    Settled,
    Lost,
}

/// The subscription: one netlink socket, open for the length of a drain only (while it is open,
/// the kernel builds a message for every TCP socket freed in the namespace).
pub struct Closes {
    socket: AsyncFd<std::fs::File>,
    ports: HashSet<u16>,
    /// Envoy's sockets freed since `restart_count`.
    counted: u64,
    /// Envoy's sockets seen freed within the last `lag` (when, how many), oldest first.
    recent: VecDeque<(Instant, u64)>,
    /// How long Envoy's count may still include a connection whose socket was freed.
    lag: Duration,
    /// Of the ends before the last `restart_count`, those within `lag` of it: the count read then
    /// may or may not include them.
    lagged: u64,
    /// The last end seen, and when the count last restarted.
    last_end: Option<Instant>,
    restarted: Instant,
    /// The kernel dropped messages (a full receive buffer): how many ended is unknown.
    overflowed: bool,
}

impl Closes {
    /// Subscribes to the ends of the TCP connections whose local port is in `ports`.
    /// `lag`: how long after a socket is freed Envoy's count may still include its connection.
    pub fn subscribe(ports: HashSet<u16>, lag: Duration) -> std::io::Result<Closes> {
        Closes::subscribe_with_buffer(ports, lag, RECEIVE_BUFFER)
    }

    fn subscribe_with_buffer(ports: HashSet<u16>, lag: Duration, buffer: libc::c_int) -> std::io::Result<Closes> {
        // SAFETY: socket(2) with constant arguments; the descriptor is owned at once below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_nl is valid; bind(2) reads it for its length.
        let bound = unsafe {
            let mut address: libc::sockaddr_nl = std::mem::zeroed();
            address.nl_family = libc::AF_NETLINK as libc::sa_family_t;
            libc::bind(
                fd,
                (&address as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if bound < 0 {
            return Err(std::io::Error::last_os_error());
        }
        set_receive_buffer(fd, buffer);
        for group in [SKNLGRP_INET_TCP_DESTROY, SKNLGRP_INET6_TCP_DESTROY] {
            // SAFETY: setsockopt(2) reads one c_int from a live local for the given length.
            let set = unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_NETLINK,
                    libc::NETLINK_ADD_MEMBERSHIP,
                    (&group as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if set < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        let file = std::fs::File::from(owned);
        // SAFETY: the File owns the descriptor and lives, unchanged, inside the AsyncFd.
        let socket =
            unsafe { AsyncFd::register_with_interest(file, Interest::READABLE) }.map_err(|e| e.into_parts().1)?;
        let (recent, restarted) = (VecDeque::new(), Instant::now());
        Ok(Closes { socket, ports, counted: 0, recent, lag, lagged: 0, last_end: None, restarted, overflowed: false })
    }

    /// Takes every message already queued, then counts from zero: called as a count is requested
    /// from Envoy, whose answer leaves out every connection that ended before it but those that
    /// ended within the lag (`lagged`), which it may still include.
    pub fn restart_count(&mut self) {
        self.read_queued();
        self.restarted = Instant::now();
        self.forget_before(self.restarted);
        self.lagged = self.recent.iter().map(|(_, freed)| freed).sum();
        self.counted = 0;
        self.overflowed = false;
    }

    /// The ends seen within the lag before the last `restart_count`.
    pub fn lagged(&self) -> u64 {
        self.lagged
    }

    /// Drops the ends older than the lag at `now`.
    fn forget_before(&mut self, now: Instant) {
        while self.recent.front().is_some_and(|(at, _)| now.saturating_duration_since(*at) > self.lag) {
            self.recent.pop_front();
        }
    }

    /// Waits until at least `wanted` of Envoy's sockets have been freed since `restart_count`
    /// (`Enough`), or ends came (from the lag before `restart_count` on) and then none for twice
    /// the lag (`Settled`: Envoy's count has caught up with them, whatever it says, and none of
    /// them is in doubt at the next read), or the kernel lost count (`Lost`). An error means no
    /// more can be learnt from the kernel.
    pub async fn ended(&mut self, wanted: u64) -> std::io::Result<Ended> {
        loop {
            self.read_queued();
            if self.overflowed {
                return Ok(Ended::Lost);
            }
            if self.counted >= wanted {
                return Ok(Ended::Enough);
            }
            let since = self.restarted.checked_sub(self.lag).unwrap_or(self.restarted);
            match self.last_end.filter(|at| *at >= since) {
                Some(at) => tokio::select! {
                    ready = self.socket.readable() => ready?.clear_ready(),
                    _ = tokio::time::sleep_until(at + self.lag * 2) => return Ok(Ended::Settled),
                },
                None => self.socket.readable().await?.clear_ready(),
            }
        }
    }

    fn read_queued(&mut self) {
        let mut buffer = [0u8; 8192];
        loop {
            match self.socket.get_ref().read(&mut buffer) {
                Ok(0) => return,
                Ok(read) => {
                    let freed = freed_on(&buffer[..read], &self.ports);
                    if freed > 0 {
                        let now = Instant::now();
                        self.counted += freed;
                        self.forget_before(now);
                        self.recent.push_back((now, freed));
                        self.last_end = Some(now);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // ENOBUFS: messages were dropped.
                Err(e) => {
                    tracing::debug!("drain: connection ends lost ({e}); reading the count");
                    self.overflowed = true;
                    return;
                }
            }
        }
    }
}

/// Asks for a receive buffer of `bytes`: beyond `net.core.rmem_max` where the launcher may
/// (CAP_NET_ADMIN), else up to it. A smaller buffer only means more reads of Envoy's count.
fn set_receive_buffer(fd: libc::c_int, bytes: libc::c_int) {
    let size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    for option in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: setsockopt(2) reads one c_int from a live local for the given length.
        let set =
            unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, option, (&bytes as *const libc::c_int).cast(), size) };
        if set == 0 {
            return;
        }
    }
}

/// How many of the netlink messages in `datagram` announce a freed connection (a socket with a
/// peer: not a listener closed) whose local port is in `ports`.
fn freed_on(datagram: &[u8], ports: &HashSet<u16>) -> u64 {
    let mut count = 0;
    let mut rest = datagram;
    while rest.len() >= NLMSG_HEADER {
        let length = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        if length < NLMSG_HEADER || length > rest.len() {
            break;
        }
        if kind != NLMSG_ERROR && length >= DPORT_OFFSET + 2 {
            let port = u16::from_be_bytes([rest[SPORT_OFFSET], rest[SPORT_OFFSET + 1]]);
            let peer = u16::from_be_bytes([rest[DPORT_OFFSET], rest[DPORT_OFFSET + 1]]);
            count += u64::from(peer != 0 && ports.contains(&port));
        }
        // Messages are aligned to 4 bytes.
        rest = &rest[length.next_multiple_of(4).min(rest.len())..];
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(sport: u16, dport: u16, kind: u16) -> Vec<u8> {
        let mut m = vec![0u8; NLMSG_HEADER + 72];
        let length = m.len() as u32;
        m[..4].copy_from_slice(&length.to_ne_bytes());
        m[4..6].copy_from_slice(&kind.to_ne_bytes());
        m[SPORT_OFFSET..SPORT_OFFSET + 2].copy_from_slice(&sport.to_be_bytes());
        m[DPORT_OFFSET..DPORT_OFFSET + 2].copy_from_slice(&dport.to_be_bytes());
        m
    }

    #[test]
    fn counts_the_freed_connections_on_the_given_ports() {
        let ports = HashSet::from([8080, 8443]);
        let datagram = [
            message(8080, 50000, 20),
            message(40000, 8080, 20),
            message(8443, 50001, 20),
            message(8080, 50002, NLMSG_ERROR),
            message(8443, 0, 20), // the listener itself, closed
        ]
        .concat();
        assert_eq!(freed_on(&datagram, &ports), 2);
        assert_eq!(freed_on(&datagram[..10], &ports), 0, "a truncated header");
    }

    #[tokio::test]
    async fn a_connection_closed_on_a_watched_port_is_seen() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let mut closes =
            Closes::subscribe(HashSet::from([port]), Duration::from_millis(20)).expect("sock_diag destroy group");
        closes.restart_count();
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let (served, _) = listener.accept().expect("accept");
        drop(served);
        tokio::time::timeout(std::time::Duration::from_secs(10), closes.ended(1))
            .await
            .expect("the server side's end within 10 s")
            .expect("read");
        drop(client);
    }

    /// `count` connections to a listener of ours, each accepted as it comes (the backlog is short):
    /// its port, the clients' ends and the served ends.
    fn accepted(count: usize) -> (u16, Vec<std::net::TcpStream>, Vec<std::net::TcpStream>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (mut clients, mut served) = (Vec::with_capacity(count), Vec::with_capacity(count));
        for _ in 0..count {
            clients.push(std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect"));
            served.push(listener.accept().expect("accept").0);
        }
        (port, clients, served)
    }

    /// `count` accepted connections; the served ends are closed, all at once, by the closure returned.
    fn close_together(count: usize) -> (u16, Vec<std::net::TcpStream>, Box<dyn FnOnce()>) {
        let (port, clients, served) = accepted(count);
        (port, clients, Box::new(move || drop(served)))
    }

    /// Waits for `wanted` ends or word that some were lost; whether none was.
    async fn ends_counted(closes: &mut Closes, wanted: u64) -> bool {
        tokio::time::timeout(std::time::Duration::from_secs(20), closes.ended(wanted))
            .await
            .expect("all the ends, or word that some were lost, within 20 s")
            .expect("read");
        !closes.overflowed
    }

    #[tokio::test]
    async fn two_thousand_ends_at_once_lose_none() {
        // With the kernel's default buffer (208 KiB) a reader that looks late lost them (0 counted).
        // Not every end is announced at once (a socket whose peer's ACK came while it was busy
        // closing lingers for tcp_fin_timeout, which the drain's backstop is for): what is
        // asserted is that none of those announced is lost.
        const ENDS: u64 = 2000;
        let (port, clients, close) = close_together(ENDS as usize);
        let mut closes =
            Closes::subscribe(HashSet::from([port]), Duration::from_millis(20)).expect("sock_diag destroy group");
        closes.restart_count();
        close();
        std::thread::sleep(std::time::Duration::from_millis(300));
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), closes.ended(ENDS)).await;
        assert!(!closes.overflowed, "no end was lost; {} counted", closes.counted);
        assert!(closes.counted > 0 && closes.counted <= ENDS, "{} of {ENDS} counted", closes.counted);
        drop(clients);
    }

    #[tokio::test]
    async fn ends_lost_by_the_kernel_end_the_wait_for_them() {
        // The kernel's least buffer: a few messages, and the rest dropped. The wait must not go on
        // for ends that will never be told (the drain then reads Envoy's count).
        const ENDS: usize = 200;
        let (port, clients, close) = close_together(ENDS);
        let mut closes = Closes::subscribe_with_buffer(HashSet::from([port]), Duration::from_millis(20), 1)
            .expect("sock_diag destroy group");
        closes.restart_count();
        close();
        // Not synchronisation: the kernel announces the ends from a work queue, and a reader that
        // keeps up loses none; this one looks only after they were all sent.
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(!ends_counted(&mut closes, ENDS as u64).await, "the ends overflowed the buffer, as meant");
        assert!(closes.counted < ENDS as u64, "{} of {ENDS} counted", closes.counted);
        closes.restart_count();
        assert!(!closes.overflowed && closes.counted == 0, "a count read from Envoy starts afresh");
        drop(clients);
    }

    /// `count` accepted connections whose clients have closed and whose served ends have read the
    /// close; dropping the served ends frees their sockets at once (the peer's ACK is all that is left).
    fn closed_by_clients(count: usize) -> (u16, Vec<std::net::TcpStream>) {
        let (port, clients, served) = accepted(count);
        drop(clients);
        for mut stream in &served {
            assert_eq!(stream.read(&mut [0u8; 1]).expect("read the client's close"), 0);
        }
        (port, served)
    }

    /// A subscription with `lag`, restarted, then `count` served ends freed.
    fn freed_after_subscribing(count: usize, lag: Duration) -> Closes {
        let (port, served) = closed_by_clients(count);
        let mut closes = Closes::subscribe(HashSet::from([port]), lag).expect("sock_diag destroy group");
        closes.restart_count();
        drop(served);
        closes
    }

    #[tokio::test]
    async fn ends_within_the_lag_before_a_count_is_read_are_held_as_lagged() {
        // A lag longer than the test: every end before the restart is within it.
        const ENDS: usize = 40;
        let mut closes = freed_after_subscribing(ENDS, Duration::from_secs(600));
        assert!(ends_counted(&mut closes, ENDS as u64).await);
        assert_eq!((closes.counted, closes.lagged()), (ENDS as u64, 0));
        closes.restart_count();
        assert_eq!((closes.counted, closes.lagged()), (0, ENDS as u64), "the ends before the read, held as lagged");
    }

    #[tokio::test]
    async fn a_wait_for_more_ends_than_come_ends_once_they_stop_for_twice_the_lag() {
        // Envoy's count can fall later than the lag after the ends (a worker deleting thousands of
        // connections in one loop): the ends it still counted will not come again.
        const ENDS: usize = 20;
        let mut closes = freed_after_subscribing(ENDS, Duration::from_millis(50));
        let settled = tokio::time::timeout(Duration::from_secs(10), closes.ended(1000)).await;
        let why = settled.expect("the wait ends once the ends stop for twice the lag").expect("read");
        assert_eq!(why, Ended::Settled);
        assert!(closes.counted > 0 && closes.counted <= ENDS as u64, "{} of {ENDS} counted", closes.counted);
    }

    #[tokio::test(start_paused = true)]
    async fn without_any_end_the_wait_goes_on() {
        let (port, _served) = closed_by_clients(1);
        let mut closes = Closes::subscribe(HashSet::from([port]), Duration::from_millis(20)).expect("sock_diag");
        closes.restart_count();
        let waited = tokio::time::timeout(Duration::from_secs(3600), closes.ended(1)).await;
        assert!(waited.is_err(), "nothing ended, so nothing settles the wait");
    }
}
