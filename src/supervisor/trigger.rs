//! What asks for a reload, and what that asks of it: whether it must be a cold handover, whom to
//! answer, and the checks it brings along (those run while the watched files settled).

use std::path::PathBuf;

use super::checks::CheckRun;
use super::reload_state::ReloadReply;

#[derive(Debug)]
pub enum Trigger {
    /// SIGHUP (systemd's `ExecReload`, `docker kill -s HUP`).
    Signal,
    /// `POST /reload` (`sesame reload`), answered when the reload ends; `cold` for `?cold=true`.
    Control { reply: Option<ReloadReply>, cold: bool },
    /// A debounce of the watcher ended: these files changed since the last one (none: files touched
    /// again after a refused reload). `checks`: those run while they settled, if they stand for the
    /// files as they are now.
    FilesSettled { changed: Vec<PathBuf>, checks: Option<Box<CheckRun>> },
    /// The recovery's timer, while hot restarts are blocked for this reason.
    Recovery { why: String },
    /// The current epoch's draining parent ended early: the current epoch will abort.
    ParentLost { epoch: u32 },
    /// Envoy did not confirm a secret swapped in place (its watch may be gone with a deleted
    /// directory): a new epoch reads the secrets at its start instead.
    Unconfirmed { secret: String },
}

impl Trigger {
    /// Whether only a cold handover to a new Envoy family will do.
    pub fn cold(&self) -> bool {
        matches!(self, Trigger::Control { cold: true, .. } | Trigger::Recovery { .. } | Trigger::ParentLost { .. })
    }

    /// Its caller, to be answered when the reload it joins ends.
    pub fn take_reply(&mut self) -> Option<ReloadReply> {
        match self {
            Trigger::Control { reply, .. } => reply.take(),
            _ => None,
        }
    }

    /// The checks it brings along, taken out.
    pub fn take_checks(&mut self) -> Option<CheckRun> {
        match self {
            Trigger::FilesSettled { checks, .. } => checks.take().map(|run| *run),
            _ => None,
        }
    }
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trigger::Signal => f.write_str("SIGHUP"),
            Trigger::Control { cold: false, .. } => f.write_str("control API"),
            Trigger::Control { cold: true, .. } => f.write_str("control API (cold)"),
            Trigger::FilesSettled { changed, .. } if changed.is_empty() => {
                f.write_str("touched again since the refused reload")
            }
            Trigger::FilesSettled { changed, .. } => {
                let names: Vec<String> = changed.iter().map(|f| f.display().to_string()).collect();
                write!(f, "changed: {}", names.join(", "))
            }
            Trigger::Recovery { why } => write!(f, "recovery ({why})"),
            Trigger::ParentLost { epoch } => write!(f, "draining epoch {epoch} ended early"),
            Trigger::Unconfirmed { secret } => write!(f, "Envoy did not confirm {secret} swapped in place"),
        }
    }
}
