//! When a drain reads Envoy's connection count again. A steady poll reacts half an interval late on
//! average and costs Envoy's admin a request each time; where the kernel can tell (every listener
//! on a TCP port, sock_diag available) the count is read again as soon as enough of Envoy's
//! connections have ended for it to be at the threshold, with a slow poll as the backstop.

use std::collections::HashSet;
use std::time::Duration;

use tokio::time::Instant;

use super::closes::{Closes, Ended};
use crate::admin::AdminClient;

/// With ends watched, the steady poll is this many times slower: it only catches what the kernel
/// does not show in time (a socket that lingers after Envoy closed it, a peer that never answers,
/// an older epoch's share of the count that changes at its stats flush).
const BACKSTOP_FACTOR: u32 = 5;

/// The first read that ends bring is at once; each one after it waits twice as long since the
/// previous read, up to the steady interval: new connections that keep coming and going (late
/// clients, a scraper) cannot make the drain ask Envoy more often than the steady poll would. The
/// reads that enough ends bring, each of which should be the last, are spaced apart from those that
/// ends settling bring, which only bring the count up to date: a long trickle of ends read at the
/// steady pace does not hold back the read after the last of them.
const FIRST_SPACING: Duration = Duration::from_millis(1);

/// Envoy frees a connection's socket a moment before its count says so (the count drops when the
/// connection object is deleted, at the end of its worker's event loop iteration): ends seen this
/// close before a read may still be in its answer, so they are counted towards the next read too.
const COUNT_LAG: Duration = Duration::from_millis(20);

pub struct Pace {
    closes: Option<Closes>,
    poll: Duration,
    /// The least time between the last read and one that settled (or lost) ends bring ...
    spacing: Duration,
    /// ... and one that enough ends bring.
    due_spacing: Duration,
    last_read: Instant,
}

impl Pace {
    /// Watches the ends of connections on Envoy's listeners when it can (leaving out those of the
    /// listeners whose names `ignore` matches), else polls every `poll`.
    pub async fn start(admin: &AdminClient, poll: Duration, ignore: &[regex::Regex]) -> Pace {
        let closes = match watchable_ports(admin, ignore).await {
            Ok(ports) => match Closes::subscribe(ports, COUNT_LAG) {
                Ok(closes) => Some(closes),
                Err(e) => {
                    tracing::info!("drain: polling Envoy every {poll:?} (cannot watch connections end: {e})");
                    None
                }
            },
            Err(why) => {
                tracing::info!("drain: polling Envoy every {poll:?} ({why})");
                None
            }
        };
        Pace::with(closes, poll)
    }

    /// A steady poll only.
    pub fn steady(poll: Duration) -> Pace {
        Pace::with(None, poll)
    }

    fn with(closes: Option<Closes>, poll: Duration) -> Pace {
        Pace { closes, poll, spacing: Duration::ZERO, due_spacing: Duration::ZERO, last_read: Instant::now() }
    }

    /// Called as the count is requested: what ends from now on is what the answer may not include.
    pub fn counting(&mut self) {
        self.last_read = Instant::now();
        if let Some(closes) = &mut self.closes {
            closes.restart_count();
        }
    }

    /// Waits until the count is worth reading again, after it was `open` (None: the read failed)
    /// against a `threshold`.
    pub async fn next(&mut self, open: Option<u64>, threshold: u64) {
        let Some(closes) = &mut self.closes else { return tokio::time::sleep(self.poll).await };
        let backstop = tokio::time::sleep(self.poll * BACKSTOP_FACTOR);
        let wanted = match open {
            Some(open) if open > threshold => open - threshold,
            // At the threshold already (the drain waits for something else), or the read failed.
            _ => return backstop.await,
        };
        // The count read may include connections whose ends came just before it: those ends count
        // towards what it takes to reach the threshold, and a burst of ends that outlasts the lag
        // is read once it is over, not at every step of the spacing.
        let wanted = wanted.saturating_sub(closes.lagged());
        let (poll, last_read) = (self.poll, self.last_read);
        let (spacing, due_spacing) = (&mut self.spacing, &mut self.due_spacing);
        let ended = async {
            let why = closes.ended(wanted).await?;
            let spacing = if why == Ended::Enough { due_spacing } else { spacing };
            tokio::time::sleep_until(last_read + *spacing).await;
            *spacing = (*spacing * 2).clamp(FIRST_SPACING, poll);
            std::io::Result::Ok(why)
        };
        tokio::select! {
            ended = ended => match ended {
                Ok(why) => tracing::debug!("drain: reading the count ({wanted} more connection ends wanted: {why:?})"),
                Err(e) => {
                    tracing::info!("drain: polling Envoy every {:?} (cannot watch connections end: {e})", self.poll);
                    self.closes = None;
                }
            },
            _ = backstop => tracing::debug!("drain: reading the count (backstop)"),
        }
    }
}

/// The ports of Envoy's listeners (but those `ignore` names, unless a counted one shares the port),
/// when the end of each of their connections is a TCP socket freed in this network namespace:
/// every listener on a TCP port, none also bound for UDP (QUIC).
async fn watchable_ports(admin: &AdminClient, ignore: &[regex::Regex]) -> Result<HashSet<u16>, String> {
    let listeners = admin.listener_ports().await.map_err(|e| format!("cannot list Envoy's listeners: {e}"))?;
    let mut ports = HashSet::new();
    for (name, port) in &listeners {
        let Some(port) = port else { return Err(format!("listener '{name}' is not on a TCP port")) };
        if !ignore.iter().any(|r| r.is_match(name)) {
            ports.insert(*port);
        }
    }
    let udp = procfs::net::udp().unwrap_or_default().into_iter().map(|e| e.local_address.port());
    let udp6 = procfs::net::udp6().unwrap_or_default().into_iter().map(|e| e.local_address.port());
    let all: HashSet<u16> = listeners.iter().filter_map(|(_, port)| *port).collect();
    if let Some(port) = udp.chain(udp6).find(|port| all.contains(port)) {
        return Err(format!("port {port} is also bound for UDP, whose connections the kernel does not show"));
    }
    Ok(ports)
}
