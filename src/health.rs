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
}

/// What the last probe found, as `/status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct EnvoyReport {
    /// Envoy's own state (LIVE, DRAINING, PRE_INITIALIZING, INITIALIZING), None when it did not answer.
    pub state: Option<String>,
    /// The epoch that answered on the admin address.
    pub restart_epoch: Option<u32>,
    /// Listeners stopped through the admin (`/drain_listeners`): they refuse connections.
    pub listeners_stopped: Option<u64>,
    /// Why the admin did not answer.
    pub error: Option<String>,
    /// When the admin last answered.
    pub answered_unix: Option<u64>,
}

#[derive(Debug, Clone)]
struct Answer {
    asked: Instant,
    /// What was expected when it was asked: an answer about an epoch the supervisor has moved on
    /// from is stale, however young.
    expected: (u32, Option<u32>),
    result: Result<EnvoyHealth, String>,
}

/// The probe, shared by every asker.
#[derive(Debug)]
pub struct Health {
    last: Mutex<Option<Answer>>,
    /// When the admin last answered (the launcher's start until it has).
    answered: std::sync::Mutex<(Instant, SystemTime)>,
    answered_ever: std::sync::atomic::AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            last: Mutex::new(None),
            answered: std::sync::Mutex::new((Instant::now(), SystemTime::now())),
            answered_ever: Default::default(),
        }
    }
}

impl Health {
    /// Envoy's answer, at most `PROBE_TTL` old. Concurrent askers wait for one request.
    pub async fn probe(&self, target: &ProbeTarget) -> Result<EnvoyHealth, String> {
        let expected = (target.current, target.starting);
        let mut last = self.last.lock().await;
        if let Some(answer) = last.as_ref().filter(|a| a.asked.elapsed() < PROBE_TTL && a.expected == expected) {
            return answer.result.clone();
        }
        let asked = Instant::now();
        let result = match tokio::time::timeout(PROBE_TIMEOUT, target.admin.health()).await {
            Ok(Ok(health)) => Ok(health),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("{} did not answer within {PROBE_TIMEOUT:?}", target.admin.address())),
        };
        if result.is_ok() {
            *self.answered.lock().unwrap_or_else(|p| p.into_inner()) = (Instant::now(), SystemTime::now());
            self.answered_ever.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        *last = Some(Answer { asked, expected, result: result.clone() });
        result
    }

    /// How long ago the admin last answered (since the launcher started, until it has).
    pub fn silent_for(&self) -> Duration {
        self.answered.lock().unwrap_or_else(|p| p.into_inner()).0.elapsed()
    }

    pub fn report(&self, result: &Result<EnvoyHealth, String>) -> EnvoyReport {
        let answered_ever = self.answered_ever.load(std::sync::atomic::Ordering::Relaxed);
        let answered_at = self.answered.lock().unwrap_or_else(|p| p.into_inner()).1;
        let answered_unix = answered_ever.then(|| unix_seconds(answered_at));
        match result {
            Ok(h) => EnvoyReport {
                state: Some(h.state.clone()),
                restart_epoch: Some(h.restart_epoch),
                listeners_stopped: Some(h.listeners_stopped),
                error: None,
                answered_unix,
            },
            Err(e) => EnvoyReport {
                state: None,
                restart_epoch: None,
                listeners_stopped: None,
                error: Some(e.clone()),
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
            "{} is answered by an Envoy of another hot-restart family ({:?})",
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

/// The liveness rule: Envoy's admin answered within the last `LIVENESS_GRACE`.
pub fn alive(silent_for: Duration) -> Result<(), String> {
    if silent_for < LIVENESS_GRACE {
        return Ok(());
    }
    Err(format!("Envoy's admin has not answered for {}s", silent_for.as_secs()))
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
        }
    }

    fn answer(state: &str, restart_epoch: u32, listeners_stopped: u64) -> Result<EnvoyHealth, String> {
        let family = Family { base_id_path: None, base_id: Some(41) };
        Ok(EnvoyHealth { state: state.into(), restart_epoch, listeners_stopped, family })
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
        let cached = Answer { asked: Instant::now(), expected: (0, None), result: answer("LIVE", 0, 0) };
        *health.last.lock().await = Some(cached.clone());
        assert!(health.probe(&target).await.is_ok(), "cached, not asked again");
        let promoted = super::tests::target(1, None);
        assert!(health.probe(&promoted).await.is_err(), "an answer from before a promotion is stale");
        *health.last.lock().await = Some(cached);
        tokio::time::advance(PROBE_TTL).await;
        assert_eq!(health.probe(&target).await.expect_err("asked again"), first);
        assert!(health.silent_for() >= PROBE_TTL, "never answered: silent since the start");
    }
}
