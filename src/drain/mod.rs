//! The graceful drain: fail Envoy's health check, wait out the drain delay, drain its listeners, and
//! poll its downstream connections until they reach the threshold or the timeout. The drain only
//! talks to Envoy's admin: it publishes the connection count and returns how it ended to the
//! supervisor, which started it; it never signals a process.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use hyper::Method;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::admin::{AdminClient, Ignored, Listeners};

mod closes;
mod pace;

use pace::Pace;

/// The open downstream connections at the last poll; None before the first poll and when it failed.
pub type Progress = watch::Sender<Option<u64>>;

/// The knobs of a drain (docs/ARCHITECTURE.md, "The graceful drain").
#[derive(Debug, Clone)]
pub struct DrainSettings {
    /// Time for load balancers to notice the failed health check before the listeners drain.
    pub delay: Duration,
    /// POST /healthcheck/fail before anything else.
    pub healthcheck_fail: bool,
    /// Drain only listeners whose traffic_direction is INBOUND.
    pub inbound_only: bool,
    /// The listeners whose connections are waited for (the INBOUND ones with `inbound_only`).
    pub counted: Listeners,
    pub poll: Duration,
    /// Done when at most this many downstream connections are open ...
    pub connections: u64,
    /// ... and at least this long has passed since the drain started.
    pub min: Duration,
    /// Upper bound on the whole drain, delay included: SIGTERM follows at the latest then.
    pub timeout: Duration,
    /// Listeners keep accepting until SIGTERM (`skip_exit`) rather than stop at Envoy's drain time.
    pub keep_listening: bool,
    /// Listeners not waited for, by name or stat name (whole-name regexes).
    pub ignore: Vec<regex::Regex>,
}

impl DrainSettings {
    /// The `/drain_listeners` request of this drain.
    pub fn drain_path(&self) -> String {
        let mut path = String::from("/drain_listeners?graceful");
        if self.keep_listening {
            path.push_str("&skip_exit");
        }
        if self.inbound_only {
            path.push_str("&inboundonly");
        }
        path
    }
}

/// Consecutive admin failures after which the drain stops waiting for an admin that is gone.
pub const ADMIN_ERROR_LIMIT: u32 = 5;

/// Why a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainEnd {
    Threshold,
    Timeout,
    AdminUnreachable,
    SecondSignal,
    EnvoyExited,
}

impl DrainEnd {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            DrainEnd::Threshold => "threshold",
            DrainEnd::Timeout => "timeout",
            DrainEnd::AdminUnreachable => "admin_unreachable",
            DrainEnd::SecondSignal => "second_signal",
            DrainEnd::EnvoyExited => "envoy_exited",
        }
    }
}

impl std::fmt::Display for DrainEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DrainEnd::Threshold => "connections reached the threshold",
            DrainEnd::Timeout => "drain timeout reached",
            DrainEnd::AdminUnreachable => "Envoy's admin is unreachable",
            DrainEnd::SecondSignal => "a second signal skipped the rest",
            DrainEnd::EnvoyExited => "Envoy exited",
        })
    }
}

/// Whether an older epoch (from a hot restart) still serves its last connections, as the
/// supervisor sees it now: while one does, its connections are counted too (through
/// `server.total_connections`, which keeps its last share once it is gone, so only while it lives).
pub type OlderEpoch = watch::Receiver<bool>;

/// What one poll means: done (and why), or poll again. `connections` is None when the poll failed.
pub fn after_poll(
    settings: &DrainSettings,
    elapsed: Duration,
    connections: Option<u64>,
    consecutive_errors: u32,
    older_uncounted: bool,
) -> Option<DrainEnd> {
    // An older epoch whose connections could not be read from it: they reach the current epoch's
    // stats only at its next flush, seconds later, so the drain waits for its exit, which it does on
    // its own at its parent shutdown time.
    let done = connections.is_some_and(|open| open <= settings.connections) && !older_uncounted;
    if done && elapsed >= settings.min {
        return Some(DrainEnd::Threshold);
    }
    if consecutive_errors >= ADMIN_ERROR_LIMIT {
        return Some(DrainEnd::AdminUnreachable);
    }
    if elapsed >= settings.timeout {
        return Some(DrainEnd::Timeout);
    }
    None
}

/// Runs the drain, publishing each poll's count in `progress`; returns how it ended.
/// `older_admin` reaches the older epoch of a hot restart, if one lives, over its kept connection.
pub async fn run(
    admin: AdminClient,
    settings: DrainSettings,
    older: OlderEpoch,
    older_admin: Option<AdminClient>,
    progress: Progress,
) -> DrainEnd {
    let started = Instant::now();
    let deadline = started + settings.timeout;
    let mut older = Older { alive: older, admin: older_admin };
    let polls = AtomicU32::new(0);
    let steps = drain_steps(&admin, &settings, &mut older, started, &progress, &polls);
    let end = tokio::time::timeout_at(deadline, steps).await.unwrap_or(DrainEnd::Timeout);
    // What the drain cost Envoy's admin (the benchmark reports it as requests per second).
    let took = started.elapsed().as_secs_f64();
    let requests = admin.requests_sent() + older.admin.as_ref().map_or(0, AdminClient::requests_sent);
    tracing::info!(
        "drain: {} connection polls of the admin in {took:.3} s, {requests} admin requests in all",
        polls.into_inner()
    );
    end
}

async fn drain_steps(
    admin: &AdminClient,
    settings: &DrainSettings,
    older: &mut Older,
    started: Instant,
    progress: &Progress,
    polls: &AtomicU32,
) -> DrainEnd {
    let mut consecutive_errors = 0;
    // The steps Envoy has not taken (its admin not up yet: a SIGTERM just after the start), sent
    // again before each read of the count, in order, until it has them.
    let mut unsent: Vec<String> = Vec::new();
    if settings.healthcheck_fail && !post(admin, "/healthcheck/fail", &mut consecutive_errors).await {
        unsent.push("/healthcheck/fail".to_string());
    }
    if !settings.delay.is_zero() {
        tracing::info!("drain: waiting {:?} for load balancers to notice", settings.delay);
        tokio::time::sleep(settings.delay).await;
    }
    let drain_path = settings.drain_path();
    if !post(admin, &drain_path, &mut consecutive_errors).await {
        unsent.push(drain_path);
    }
    let mut ignored = ignored_listeners(admin, &settings.ignore).await;
    let mut pace = Pace::start(admin, settings.poll, &settings.ignore).await;
    loop {
        polls.fetch_add(1, Ordering::Relaxed);
        if !unsent.is_empty() && send_again(admin, &mut unsent).await {
            // What could not be asked of an admin that was not up: the listeners' names and ports.
            ignored = ignored_listeners(admin, &settings.ignore).await;
            pace = Pace::start(admin, settings.poll, &settings.ignore).await;
        }
        pace.counting();
        let older_alive = *older.alive.borrow_and_update();
        let read = admin.connections_across_epochs(&settings.counted, &ignored, older_alive, older.admin.as_ref());
        let (connections, older_uncounted) = match read.await {
            Ok((open, complete)) => {
                consecutive_errors = 0;
                (Some(open), !complete)
            }
            Err(e) => {
                consecutive_errors += 1;
                // The first failure in a row is worth a warning; the rest of the streak is noise.
                if consecutive_errors == 1 {
                    tracing::warn!("drain: {e}");
                } else {
                    tracing::debug!("drain: {e}");
                }
                (None, older_alive)
            }
        };
        progress.send_replace(connections);
        let ended = after_poll(settings, started.elapsed(), connections, consecutive_errors, older_uncounted);
        if let Some(end) = ended {
            return end;
        }
        // Besides the pace: an older epoch's exit, or the end of the minimum with the count at the
        // threshold, can end the drain too.
        let min_over = started + settings.min;
        let waits_for_min = connections.is_some_and(|open| open <= settings.connections) && Instant::now() < min_over;
        tokio::select! {
            _ = pace.next(connections, settings.connections) => {}
            _ = exited(&mut older.alive), if older_alive => {}
            _ = tokio::time::sleep_until(min_over), if waits_for_min => {}
        }
    }
}

/// A hot restart's older epoch: whether it lives, and its admin over its kept connection.
struct Older {
    alive: OlderEpoch,
    admin: Option<AdminClient>,
}

/// Resolves when the older epoch is seen gone (never, once nobody can say).
async fn exited(older: &mut OlderEpoch) {
    if older.wait_for(|alive| !alive).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The stat names (`listener.<stat name>.`) of the listeners that `ignore` leaves out of the count:
/// the listeners named so (read once, when the drain starts: `name` and `stat_prefix` or address),
/// and any stat name the regexes match themselves. An admin that cannot say leaves only the latter.
async fn ignored_listeners(admin: &AdminClient, ignore: &[regex::Regex]) -> Ignored {
    if ignore.is_empty() {
        return Ignored::default();
    }
    let named = match admin.listener_stat_names().await {
        Ok(listeners) => {
            listeners.into_iter().filter(|(name, _)| ignore.iter().any(|r| r.is_match(name))).map(|(_, s)| s).collect()
        }
        Err(e) => {
            tracing::warn!("drain: cannot list the listeners to leave out by name ({e}); matching stat names only");
            Vec::new()
        }
    };
    tracing::info!(
        "drain: not waiting for the listeners {named:?} (--drain-ignore-listener), nor any stat name it matches"
    );
    Ignored { stat_names: named, patterns: ignore.to_vec() }
}

/// Drains an Envoy family that a new family has replaced in a cold handover (the new family already
/// accepts on the same ports): the old one fails its health check (its responses ask clients to
/// close), starts its drain sequence without exiting, and stops accepting at once, as a hot
/// restart's parent does. Ends when at most `settings.connections` are open (the old family's own
/// epochs, `older_alive` when it has two), at `until`, or when its admin is gone.
pub async fn old_family(admin: AdminClient, settings: DrainSettings, older_alive: bool, until: Instant) -> DrainEnd {
    let steps = async {
        let mut consecutive_errors = 0;
        post(&admin, "/healthcheck/fail", &mut consecutive_errors).await;
        post(&admin, "/drain_listeners?graceful&skip_exit", &mut consecutive_errors).await;
        post(&admin, "/drain_listeners", &mut consecutive_errors).await;
        // The new family listens on the same ports: their ends say nothing of the old family's.
        let mut pace = Pace::steady(settings.poll);
        let none_ignored = Ignored::default();
        loop {
            let read = admin.connections_across_epochs(&settings.counted, &none_ignored, older_alive, None);
            let open = match read.await {
                Ok((open, _)) if open <= settings.connections => return DrainEnd::Threshold,
                Ok((open, _)) => {
                    consecutive_errors = 0;
                    Some(open)
                }
                Err(e) => {
                    consecutive_errors += 1;
                    tracing::debug!("drain of the old family: {e}");
                    if consecutive_errors >= ADMIN_ERROR_LIMIT {
                        return DrainEnd::AdminUnreachable;
                    }
                    None
                }
            };
            pace.next(open, settings.connections).await;
        }
    };
    tokio::time::timeout_at(until, steps).await.unwrap_or(DrainEnd::Timeout)
}

/// A drain step that may fail: the failure is logged and counted, and the drain goes on; whether
/// Envoy took it.
async fn post(admin: &AdminClient, path: &str, consecutive_errors: &mut u32) -> bool {
    let took = try_post(admin, path).await;
    *consecutive_errors = if took { 0 } else { *consecutive_errors + 1 };
    took
}

/// A drain step, its failure logged; whether Envoy took it.
async fn try_post(admin: &AdminClient, path: &str) -> bool {
    let answer = admin.expect_ok(Method::POST, path).await;
    if let Err(e) = &answer {
        tracing::warn!("drain: {e}");
    }
    answer.is_ok()
}

/// Sends the `unsent` steps again, in order, up to the first that fails; whether all are sent now.
/// Only the reads count towards the error limit: a step sent again adds no failure of its own.
async fn send_again(admin: &AdminClient, unsent: &mut Vec<String>) -> bool {
    while let Some(path) = unsent.first() {
        if !try_post(admin, path).await {
            return false;
        }
        tracing::info!("drain: Envoy took {path}, which it could not take before");
        unsent.remove(0);
    }
    true
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::http::Endpoint;

    /// A drain's settings for tests: the defaults, with a 2 s minimum.
    pub(crate) fn settings() -> DrainSettings {
        DrainSettings {
            delay: Duration::ZERO,
            healthcheck_fail: true,
            inbound_only: false,
            counted: Listeners::All,
            keep_listening: true,
            ignore: Vec::new(),
            poll: Duration::from_millis(100),
            connections: 0,
            min: Duration::from_secs(2),
            timeout: Duration::from_secs(60),
        }
    }

    #[test]
    fn threshold_counts_only_after_the_minimum() {
        let s = settings();
        assert_eq!(after_poll(&s, Duration::from_secs(1), Some(0), 0, false), None);
        assert_eq!(after_poll(&s, Duration::from_secs(2), Some(0), 0, false), Some(DrainEnd::Threshold));
        assert_eq!(after_poll(&s, Duration::from_secs(3), Some(1), 0, false), None);
        assert_eq!(after_poll(&s, Duration::from_secs(3), Some(0), 0, true), None, "an older epoch lives");
        let s = DrainSettings { connections: 1, ..s };
        assert_eq!(after_poll(&s, Duration::from_secs(3), Some(1), 0, false), Some(DrainEnd::Threshold));
    }

    #[test]
    fn admin_errors_and_time_are_bounded() {
        let s = settings();
        assert_eq!(after_poll(&s, Duration::from_secs(3), None, ADMIN_ERROR_LIMIT - 1, false), None);
        let unreachable = Some(DrainEnd::AdminUnreachable);
        assert_eq!(after_poll(&s, Duration::from_secs(3), None, ADMIN_ERROR_LIMIT, false), unreachable);
        assert_eq!(after_poll(&s, Duration::from_secs(60), Some(5), 0, false), Some(DrainEnd::Timeout));
    }

    #[tokio::test(start_paused = true)]
    async fn a_missing_admin_ends_the_drain_after_the_error_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let admin = AdminClient::new(Endpoint::Unix(dir.path().join("missing.sock")));
        let (progress, polls) = watch::channel(Some(7));
        let started = Instant::now();
        let (_older, older_alive) = watch::channel(false);
        let end = run(admin, settings(), older_alive, None, progress).await;
        assert_eq!(end, DrainEnd::AdminUnreachable);
        // Two failed POSTs, then polls 100 ms apart until five failures in a row: the third poll.
        assert_eq!(started.elapsed(), Duration::from_millis(200));
        assert_eq!(*polls.borrow(), None, "a failed poll is published as no count");
    }
}
