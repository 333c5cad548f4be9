//! Long-lived connections kept across a rotation: TLS keep-alive connections to the HTTPS listener
//! and TLS connections through the `tcp_proxy` listener to the echo upstream, each making one round
//! trip every 100 ms on the connection it opened first. A connection is cut when it ends: Envoy
//! asks it to close (`connection: close` in a drain), closes or resets it, or stops answering.

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::common::tls::{TlsStream, client_config, tls_connect};
use crate::common::{read_response_head, wait_for};

const EVERY: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// HTTP/1.1 keep-alive over TLS to the HTTPS listener.
    Https,
    /// Bytes over TLS through `tcp_proxy`, echoed by the upstream.
    TcpProxy,
}

/// What one connection's thread shows while it runs.
#[derive(Default)]
struct Progress {
    round_trips: AtomicU64,
    ended: AtomicBool,
}

/// How one connection's life went.
#[derive(Debug, Clone)]
pub struct Life {
    pub kind: Kind,
    pub round_trips: u64,
    /// Why it ended before it was let go, if it did.
    pub cut: Option<String>,
}

pub struct LongLived {
    stop: Arc<AtomicBool>,
    connections: Vec<(Arc<Progress>, JoinHandle<Life>)>,
}

impl LongLived {
    /// `each` connections of each kind, opened now.
    pub fn start(https_port: u16, tcp_port: u16, each: usize) -> LongLived {
        let stop = Arc::new(AtomicBool::new(false));
        let kinds = std::iter::repeat_n((Kind::Https, https_port), each)
            .chain(std::iter::repeat_n((Kind::TcpProxy, tcp_port), each));
        let connections = kinds
            .map(|(kind, port)| {
                let (stop, progress) = (stop.clone(), Arc::new(Progress::default()));
                let shown = progress.clone();
                (progress, std::thread::spawn(move || live(kind, port, &stop, &shown)))
            })
            .collect();
        LongLived { stop, connections }
    }

    /// Waits until every connection has made a few round trips.
    pub fn wait_running(&self) {
        wait_for(Duration::from_secs(30), "the long-lived connections to run", || {
            self.connections.iter().all(|(p, _)| p.round_trips.load(Ordering::SeqCst) >= 3)
        });
    }

    /// Waits until each connection that is still open has made one more round trip (or has ended):
    /// whatever was to cut it has had its chance.
    pub fn wait_one_more_round_trip(&self) {
        let now: Vec<u64> = self.connections.iter().map(|(p, _)| p.round_trips.load(Ordering::SeqCst)).collect();
        wait_for(Duration::from_secs(30), "a round trip on every open long-lived connection", || {
            self.connections
                .iter()
                .zip(&now)
                .all(|((p, _), was)| p.ended.load(Ordering::SeqCst) || p.round_trips.load(Ordering::SeqCst) > *was)
        });
    }

    pub fn stop(self) -> Vec<Life> {
        self.stop.store(true, Ordering::SeqCst);
        self.connections.into_iter().map(|(_, thread)| thread.join().expect("long-lived connection")).collect()
    }
}

fn live(kind: Kind, port: u16, stop: &AtomicBool, progress: &Progress) -> Life {
    let (mut tls, _) = tls_connect(port, &client_config()).expect("a long-lived connection");
    let mut cut = None;
    while !stop.load(Ordering::SeqCst) {
        let sent = progress.round_trips.load(Ordering::SeqCst);
        let result = match kind {
            Kind::Https => http_round_trip(&mut tls),
            Kind::TcpProxy => echo_round_trip(&mut tls, sent),
        };
        if let Err(why) = result {
            cut = Some(why);
            break;
        }
        progress.round_trips.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(EVERY); // the pace of the connection's requests
    }
    progress.ended.store(true, Ordering::SeqCst);
    Life { kind, round_trips: progress.round_trips.load(Ordering::SeqCst), cut }
}

/// One GET; an error when it fails, is not a 200, or the server asks to close the connection.
fn http_round_trip(tls: &mut TlsStream) -> Result<(), String> {
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").map_err(|e| format!("write: {e}"))?;
    match read_response_head(tls)? {
        (200, false) => Ok(()),
        (200, true) => Err("the server asked to close the connection".into()),
        (status, _) => Err(format!("status {status}")),
    }
}

/// One line through `tcp_proxy`; an error unless the same line comes back.
fn echo_round_trip(tls: &mut TlsStream, n: u64) -> Result<(), String> {
    let line = format!("round trip {n}\n");
    tls.write_all(line.as_bytes()).map_err(|e| format!("write: {e}"))?;
    let mut back = vec![0u8; line.len()];
    tls.read_exact(&mut back).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => "closed by Envoy".to_string(),
        _ => format!("read: {e}"),
    })?;
    (back == line.as_bytes()).then_some(()).ok_or_else(|| format!("echoed {:?}", String::from_utf8_lossy(&back)))
}
