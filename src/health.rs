//! Is Envoy healthy, right now? Readiness and liveness are not taken from what the supervisor saw
//! once: each time they are asked (by `/ready`, `/status`, `/healthz`, the systemd watchdog),
//! Envoy's admin is asked too, within `PROBE_TIMEOUT`, and the answer is shared for at most
//! `PROBE_TTL`, so that a storm of probes does not become a storm of admin requests.

use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::admin::{AdminClient, EnvoyHealth, Family};
use crate::clock::unix_seconds;

/// How long Envoy's admin has to answer a probe: Envoy answers in milliseconds, so a second means
/// it is hung (SIGSTOPped, deadlocked) or overloaded.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one answer serves every asker.
pub const PROBE_TTL: Duration = Duration::from_secs(1);
/// Liveness fails once Envoy's admin has not answered for this long. One slow answer under load
/// must not get a pod restarted; an Envoy that has not answered for 10 s is hung, or its admin is
/// gone, and only a restart gives back an Envoy that can be drained and reloaded.
pub const LIVENESS_GRACE: Duration = Duration::from_secs(10);

/// Whose admin to ask, and what the supervisor expects it to say.
#[derive(Debug, Clone)]
pub struct ProbeTarget {
    pub admin: AdminClient,
    /// The epoch that serves.
    pub current: u32,
    /// A newer epoch that a reload started and that is not LIVE yet: while it initializes, the
    /// admin answers for it and the current epoch still serves.
    pub starting: Option<u32>,
    /// The hot-restart family of the launcher's Envoy: an answer from another is not Envoy's.
    pub family: Family,
    /// An older epoch lives, or exited moments ago: its counters are still being merged in.
    pub older_epoch_recently: bool,
}

/// What the last probe found, as `/status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct EnvoyReport {
    /// Envoy's own state (LIVE, DRAINING, PRE_INITIALIZING, INITIALIZING), None when it did not answer.
    pub state: Option<String>,
    /// The epoch that answered on the admin address.
    pub restart_epoch: Option<u32>,
    /// Listeners the serving epoch stopped through the admin (`/drain_listeners`): they refuse
    /// connections. (Those its draining parent stopped, merged into its count, are left out.)
    pub listeners_stopped: Option<u64>,
    /// Why the admin did not answer.
    pub error: Option<String>,
    /// What else the operator should know about the admin.
    pub note: Option<String>,
    /// When the admin last answered.
    pub answered_unix: Option<u64>,
}

/// What an answer was about: the epochs the supervisor expected, on that admin, of that family (a
/// cold handover's new family starts again at restart epoch 0, on its own admin).
type Expected = (u32, Option<u32>, String, Family);

#[derive(Debug, Clone)]
struct Answer {
    /// When the answer (or the failure) arrived: it serves every asker for `PROBE_TTL` from then.
    at: Instant,
    /// What was expected when it was asked: an answer about an epoch the supervisor has moved on
    /// from is stale, however young.
    expected: Expected,
    result: Result<EnvoyHealth, String>,
}

/// What the probes have seen over time.
#[derive(Debug, Default)]
struct Record {
    /// When the admin last answered.
    answered_at: Option<SystemTime>,
    /// Since when every probe has failed (None while the last one succeeded).
    failing_since: Option<Instant>,
    /// `listener_manager.listener_stopped` is a counter that a hot restart merges from the draining
    /// epoch into the new one: stops counted while an older epoch lived are its own, not the
    /// current epoch's. (The epoch, and the count that is not its own.)
    stopped_baseline: Option<(u32, u64)>,
}

/// The probe, shared by every asker.
#[derive(Debug)]
pub struct Health {
    last: Mutex<Option<Answer>>,
    record: std::sync::Mutex<Record>,
}

impl Default for Health {
    fn default() -> Self {
        Health { last: Mutex::new(None), record: std::sync::Mutex::new(Record::default()) }
    }
}

impl Health {
    /// Envoy's answer, at most `PROBE_TTL` old. Concurrent askers wait for one request, and share
    /// its answer (or its failure).
    pub async fn probe(&self, target: &ProbeTarget) -> Result<EnvoyHealth, String> {
        let expected = (target.current, target.starting, target.admin.address().to_string(), target.family.clone());
        let mut last = self.last.lock().await;
        if let Some(answer) = last.as_ref().filter(|a| a.at.elapsed() < PROBE_TTL && a.expected == expected) {
            return answer.result.clone();
        }
        let result = match tokio::time::timeout(PROBE_TIMEOUT, target.admin.health_anyhow()).await {
            Ok(Ok(health)) => Ok(health),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("{} did not answer within {PROBE_TIMEOUT:?}", target.admin.address())),
        };
        {
            let mut record = self.record();
            match &result {
                Ok(_) => {
                    record.answered_at = Some(SystemTime::now());
                    record.failing_since = None;
                }
                Err(_) => {
                    record.failing_since.get_or_insert_with(Instant::now);
                }
            }
        }
        *last = Some(Answer { at: Instant::now(), expected, result: result.clone() });
        result
    }

    fn record(&self) -> std::sync::MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long every probe has failed; zero while the last one succeeded.
    pub fn failing_for(&self) -> Duration {
        self.record().failing_since.map_or(Duration::ZERO, |since| since.elapsed())
    }

    /// The listeners the current epoch itself has stopped, out of what Envoy counts.
    pub fn stopped_by_current(&self, target: &ProbeTarget, counted: u64) -> u64 {
        let mut record = self.record();
        let baseline = match record.stopped_baseline {
            // While an older epoch lives (and a little after), its stops are merged in.
            Some((epoch, _)) if epoch == target.current && target.older_epoch_recently => counted,
            // The count went down: its counters were reset.
            Some((epoch, base)) if epoch == target.current => base.min(counted),
            // A family's first epoch has no parent; a later one starts with its parent's count.
            _ if target.current == 0 => 0,
            _ => counted,
        };
        record.stopped_baseline = Some((target.current, baseline));
        counted - baseline
    }

    pub fn report(&self, result: &Result<EnvoyHealth, String>) -> EnvoyReport {
        let answered_unix = self.record().answered_at.map(unix_seconds);
        match result {
            Ok(h) => EnvoyReport {
                state: Some(h.state.clone()),
                restart_epoch: Some(h.restart_epoch),
                listeners_stopped: Some(h.listeners_stopped),
                error: None,
                note: h.over_kept_connection.then(|| {
                    "Envoy's admin address takes no new connection (its socket removed, or closed by a hot-restart \
                     child that died): sesame reaches Envoy over a connection it kept open; the next hot restart \
                     or cold handover binds the address again"
                        .to_string()
                }),
                answered_unix,
            },
            Err(e) => EnvoyReport {
                state: None,
                restart_epoch: None,
                listeners_stopped: None,
                error: Some(e.clone()),
                note: None,
                answered_unix,
            },
        }
    }
}

/// The readiness rule: Envoy answered, and what answered is the epoch that serves, LIVE, with its
/// listeners open, or a newer epoch still initializing while the current one serves. While a reload
/// starts a new epoch the admin address moves to it (the old epoch closes its admin, then the new
/// one binds it), so a failed probe then is the move, not an outage: the current epoch still
/// serves, and the reload's own deadline bounds the wait. Err is why not.
pub fn ready(target: &ProbeTarget, answer: &Result<EnvoyHealth, String>) -> Result<(), String> {
    let health = match answer {
        Ok(health) => health,
        Err(_) if target.starting.is_some() => return Ok(()),
        Err(e) => return Err(format!("Envoy's admin did not answer: {e}")),
    };
    if !target.family.owns(&health.family) {
        return Err(format!(
            "{} is answered by an Envoy of another hot-restart family ({})",
            target.admin.address(),
            health.family
        ));
    }
    let initializing = matches!(health.state.as_str(), "PRE_INITIALIZING" | "INITIALIZING");
    if initializing && target.starting == Some(health.restart_epoch) {
        return Ok(());
    }
    if health.restart_epoch != target.current && target.starting != Some(health.restart_epoch) {
        return Err(format!(
            "epoch {} answers on the admin address, not the serving epoch {}",
            health.restart_epoch, target.current
        ));
    }
    match health.state.as_str() {
        "LIVE" if health.listeners_stopped > 0 => Err(format!(
            "Envoy stopped {} listeners (drain_listeners): they refuse connections",
            health.listeners_stopped
        )),
        "LIVE" => Ok(()),
        "DRAINING" => Err("Envoy is DRAINING (its health check was failed)".into()),
        other => Err(format!("Envoy is {other}")),
    }
}

/// The liveness rule: Envoy's admin has not failed every probe for `LIVENESS_GRACE` or more.
pub fn alive(failing_for: Duration) -> Result<(), String> {
    if failing_for < LIVENESS_GRACE {
        return Ok(());
    }
    Err(format!("Envoy's admin has not answered for {}s", failing_for.as_secs()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::Endpoint;

    fn target(current: u32, starting: Option<u32>) -> ProbeTarget {
        let family = Family { base_id_path: Some("/run/s/envoy-base-id".into()), base_id: Some(41) };
        ProbeTarget {
            admin: AdminClient::new(Endpoint::Unix("/nonexistent/admin.sock".into())),
            current,
            starting,
            family,
            older_epoch_recently: false,
        }
    }

    fn answer(state: &str, restart_epoch: u32, listeners_stopped: u64) -> Result<EnvoyHealth, String> {
        let family = Family { base_id_path: None, base_id: Some(41) };
        Ok(EnvoyHealth { state: state.into(), restart_epoch, listeners_stopped, family, over_kept_connection: false })
    }

    #[test]
    fn ready_only_when_the_serving_epoch_is_live_with_its_listeners() {
        assert_eq!(ready(&target(0, None), &answer("LIVE", 0, 0)), Ok(()));
        let draining = ready(&target(0, None), &answer("DRAINING", 0, 0)).expect_err("draining");
        assert!(draining.contains("DRAINING"), "{draining}");
        let stopped = ready(&target(0, None), &answer("LIVE", 0, 2)).expect_err("stopped");
        assert!(stopped.contains("stopped 2 listeners"), "{stopped}");
        let silent = ready(&target(0, None), &Err("timed out".into())).expect_err("silent");
        assert!(silent.contains("did not answer: timed out"), "{silent}");
        let initializing = ready(&target(0, None), &answer("INITIALIZING", 0, 0)).expect_err("initializing");
        assert!(initializing.contains("INITIALIZING"), "{initializing}");
    }

    #[test]
    fn a_reload_does_not_make_readiness_flap() {
        // The new epoch holds the admin while it initializes; the old one still serves.
        assert_eq!(ready(&target(3, Some(4)), &answer("PRE_INITIALIZING", 4, 0)), Ok(()));
        assert_eq!(ready(&target(3, Some(4)), &answer("INITIALIZING", 4, 0)), Ok(()));
        // LIVE before the supervisor has heard so.
        assert_eq!(ready(&target(3, Some(4)), &answer("LIVE", 4, 0)), Ok(()));
        assert_eq!(ready(&target(3, Some(4)), &answer("LIVE", 3, 0)), Ok(()));
        // An epoch nobody started answers: something else holds the admin address.
        let stranger = ready(&target(3, None), &answer("LIVE", 7, 0)).expect_err("stranger");
        assert!(stranger.contains("epoch 7 answers"), "{stranger}");
        assert!(ready(&target(3, None), &answer("INITIALIZING", 4, 0)).is_err(), "no reload started epoch 4");
        // Another launcher's Envoy on the same admin address.
        let mut foreign = answer("LIVE", 3, 0);
        if let Ok(health) = foreign.as_mut() {
            health.family = Family { base_id_path: Some("/run/other/envoy-base-id".into()), base_id: None };
        }
        let other = ready(&target(3, None), &foreign).expect_err("another family");
        assert!(other.contains("another hot-restart family"), "{other}");
        // The admin address between the old epoch closing it and the new one binding it.
        assert_eq!(ready(&target(3, Some(4)), &Err("connection refused".into())), Ok(()));
    }

    #[test]
    fn liveness_survives_a_short_silence() {
        assert_eq!(alive(Duration::from_secs(9)), Ok(()));
        let hung = alive(LIVENESS_GRACE).expect_err("hung");
        assert_eq!(hung, "Envoy's admin has not answered for 10s");
    }

    #[tokio::test(start_paused = true)]
    async fn one_answer_serves_every_asker_for_a_second() {
        let health = Health::default();
        let target = target(0, None);
        let first = health.probe(&target).await.expect_err("nobody listens");
        let expected = (0, None, target.admin.address().to_string(), target.family.clone());
        let cached = Answer { at: Instant::now(), expected, result: answer("LIVE", 0, 0) };
        *health.last.lock().await = Some(cached.clone());
        assert!(health.probe(&target).await.is_ok(), "cached, not asked again");
        // A cold handover's new family starts at restart epoch 0 again, on its own admin.
        let new_family = Family { base_id_path: Some("/run/s/envoy-base-id.family-1".into()), base_id: None };
        let handed_over = ProbeTarget { family: new_family, ..target.clone() };
        assert!(health.probe(&handed_over).await.is_err(), "another family's answer is not served");
        *health.last.lock().await = Some(cached.clone());
        let promoted = super::tests::target(1, None);
        assert!(health.probe(&promoted).await.is_err(), "an answer from before a promotion is stale");
        *health.last.lock().await = Some(cached);
        tokio::time::advance(PROBE_TTL).await;
        assert_eq!(health.probe(&target).await.expect_err("asked again"), first);
        assert!(health.failing_for() >= PROBE_TTL, "failing since the first failed probe");
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_spell_is_not_silence() {
        let health = Health::default();
        assert_eq!(health.failing_for(), Duration::ZERO, "nothing failed yet");
        *health.last.lock().await = None;
        health.record().failing_since = None;
        health.record().answered_at = Some(SystemTime::now());
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(health.failing_for(), Duration::ZERO, "no probe for 30 s is not 30 s of silence");
        let _ = health.probe(&target(0, None)).await;
        assert!(health.failing_for() < LIVENESS_GRACE, "one failed probe is not a hung Envoy");
    }

    #[test]
    fn stops_merged_from_a_draining_epoch_are_not_the_current_ones() {
        let health = Health::default();
        assert_eq!(health.stopped_by_current(&target(0, None), 0), 0);
        assert_eq!(health.stopped_by_current(&target(0, None), 1), 1, "epoch 0 has no parent: its own");
        // Epoch 1 starts with its parent's count, and absorbs what is merged while the parent lives.
        let mut with_parent = target(1, None);
        with_parent.older_epoch_recently = true;
        assert_eq!(health.stopped_by_current(&with_parent, 1), 0);
        assert_eq!(health.stopped_by_current(&with_parent, 2), 0, "the parent stopped its listeners");
        assert_eq!(health.stopped_by_current(&target(1, None), 2), 0, "the parent is gone");
        assert_eq!(health.stopped_by_current(&target(1, None), 3), 1, "epoch 1 stopped one itself");
        assert_eq!(health.stopped_by_current(&target(1, None), 0), 0, "counters reset");
    }
}
