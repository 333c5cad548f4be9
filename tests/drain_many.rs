//! A drain of many connections, with the real Envoy under sesame as PID 1 of a PID namespace: the
//! kernel announces each end, and the drain reads Envoy's count again when they are over, not at
//! every step of them.

mod common;

use std::time::Duration;

use common::{Launcher, Mode, free_port, idle_keepalive_connection, proxy_bootstrap, wait_for};
use nix::sys::signal::Signal;

const CONNECTIONS: usize = 1000;
const CLOSING: Duration = Duration::from_millis(1000);

/// Enough file descriptors for the test's connections and Envoy's (it inherits the limit).
fn raise_fd_limit(wanted: u64) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the local struct only.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && {
            limit.rlim_cur = limit.rlim_max.min(65_536);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0
        }
    };
    assert!(raised && limit.rlim_cur >= wanted, "RLIMIT_NOFILE of at least {wanted} is needed, have {limit:?}");
}

/// The count of "drain: N connection polls of the admin ..." in the log.
fn drain_polls(log: &str) -> u32 {
    let summary = log.lines().find_map(|l| l.split_once(" connection polls of the admin")).map(|(head, _)| head);
    let polls = summary.and_then(|head| head.rsplit_once("drain: ")).map(|(_, n)| n);
    polls.and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no drain summary in the log:\n{log}"))
}

/// 1,000 idle keep-alive connections closed one by one over a second, once the drain has read
/// them; the backstop poll (every 500 ms) reads the count once in the middle of the ends. Before,
/// each end just before a read made another read follow at a doubling spacing for as long as the
/// ends went on: 14 reads in all. Now the ends just before a read count towards the next one, which
/// comes when the ends are over (or have stopped for the lag): 7 or 8, the last few waiting for
/// Envoy's count, which falls tens of milliseconds after the last socket is freed.
#[test]
fn connections_ending_one_by_one_are_read_again_when_their_ends_are_over() {
    raise_fd_limit(2 * CONNECTIONS as u64 + 256);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let bootstrap = proxy_bootstrap(dir.path(), port, free_port());
    let mut launcher = Launcher::start_envoy(Mode::Pid1, &[], &bootstrap);
    let streams: Vec<_> = (0..CONNECTIONS).map(|_| idle_keepalive_connection(port)).collect();

    launcher.signal(Signal::SIGTERM);
    wait_for(Duration::from_secs(20), "the drain's first read of the connections", || {
        launcher.status()["drain"]["connections"] == CONNECTIONS as u64
    });
    // One by one, evenly over CLOSING: ends that go on far longer than the lag.
    let started = std::time::Instant::now();
    let count = streams.len() as u32;
    for (i, stream) in streams.into_iter().enumerate() {
        std::thread::sleep((started + CLOSING * i as u32 / count).saturating_duration_since(std::time::Instant::now()));
        drop(stream);
    }
    let code = launcher.exit_code(Duration::from_secs(20));
    let log = launcher.log();
    assert_eq!(code, 0, "log:\n{log}");
    assert!(log.contains("drain ended: connections reached the threshold"), "{log}");
    let polls = drain_polls(&log);
    assert!(polls <= 10, "a read at the start, one by the backstop, a few at the end; not {polls}\n{log}");
}
