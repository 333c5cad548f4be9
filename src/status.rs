//! What `/status` shows: the launcher's state as the supervisor sees it at the moment it is asked,
//! with what Envoy's admin said when it was probed for the same answer.

use serde::Serialize;

use crate::health::{EnvoyReport, ProbeTarget};

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// starting, running, draining or stopping.
    pub state: &'static str,
    /// The current epoch is LIVE (as the supervisor saw it, and as Envoy says now) and no drain is
    /// under way.
    pub ready: bool,
    /// Why not ready.
    pub not_ready: Option<String>,
    /// Why Envoy's hot restart is blocked, if it is (until a cold handover).
    pub degraded: Option<String>,
    /// The recovery from a blocked hot restart: shown while blocked, and once one has run.
    pub recovery: Option<RecoveryStatus>,
    /// What will happen, and when, that the operator should know about now.
    pub warnings: Vec<String>,
    pub current_epoch: u32,
    pub epochs: Vec<EpochStatus>,
    /// The step of the reload under way, if any.
    pub reload: Option<&'static str>,
    pub last_reload: Option<ReloadStatus>,
    pub drain: Option<DrainStatus>,
    /// `--cert-reload in-place`: each secret given to Envoy by SDS.
    pub certificates: Option<Vec<CertificateStatus>>,
    /// What Envoy's admin said when asked for this answer; None without an admin.
    pub envoy: Option<EnvoyReport>,
    /// Whose admin to ask, filled by the supervisor and asked by the control API.
    #[serde(skip)]
    pub probe: Option<ProbeTarget>,
}

/// A certificate (or CA bundle) that Envoy gets from sesame by SDS.
#[derive(Debug, Clone, Serialize)]
pub struct CertificateStatus {
    /// The certificate chain (or CA bundle) it is read from, and the key.
    pub path: String,
    pub key: Option<String>,
    /// The SDS secret's name in Envoy (its `sds.<name>.*` stats).
    pub secret: String,
    /// The leaf's serial (lowercase hex, as Envoy's `/certs` shows it) and notAfter.
    pub serial: Option<String>,
    pub not_after_unix: Option<i64>,
    /// How Envoy got what it has: "start" (read by an epoch as it started) or "in-place".
    pub rotated: &'static str,
    pub rotated_at_unix: u64,
    /// What Envoy said of it: "confirmed" (its update counter and `/certs`), or why not.
    pub envoy: String,
    /// The files' state when they settled last, if it was not applied (refused by sesame's
    /// checks, or rejected by Envoy).
    pub refused: Option<ReloadStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EpochStatus {
    pub epoch: u32,
    /// Its hot-restart family (one more for each cold handover) and its restart epoch in it.
    pub family: u32,
    pub restart_epoch: u32,
    pub pid: i32,
    pub started_unix: u64,
    /// starting (not LIVE yet), live (it serves), or draining (an older epoch, finishing its
    /// connections).
    pub state: &'static str,
    /// For a draining epoch: when it is told to exit (its successor's start plus the parent
    /// shutdown time).
    pub exits_by_unix: Option<u64>,
    /// Its admin: where it answered LIVE, or where its bootstrap says it is.
    pub admin: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReloadStatus {
    /// success, refused or failed.
    pub result: crate::outcome::ReloadResult,
    pub detail: String,
    pub at_unix: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RecoveryStatus {
    /// Off with --no-recover.
    pub enabled: bool,
    /// When the next cold handover is tried, if one is scheduled.
    pub next_attempt_in_seconds: Option<f64>,
    pub failures_in_a_row: u32,
    /// The last cold handover: its result, why it ran and how long it took.
    pub last: Option<ReloadStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DrainStatus {
    pub elapsed_seconds: f64,
    pub connections: Option<u64>,
}
