//! What `/status` shows: the launcher's state as the supervisor sees it at the moment it is asked.

use serde::Serialize;

/// What `/status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// starting, running, draining or stopping.
    pub state: &'static str,
    /// The current epoch is LIVE and no drain is under way.
    pub ready: bool,
    pub degraded: Option<String>,
    pub current_epoch: u32,
    pub epochs: Vec<EpochStatus>,
    /// The step of the reload under way, if any.
    pub reload: Option<&'static str>,
    pub last_reload: Option<ReloadStatus>,
    pub drain: Option<DrainStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EpochStatus {
    pub epoch: u32,
    pub pid: i32,
    pub started_unix: u64,
    pub live: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReloadStatus {
    /// success, refused or failed.
    pub result: &'static str,
    pub detail: String,
    pub at_unix: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DrainStatus {
    pub elapsed_seconds: f64,
    pub connections: Option<u64>,
}
