//! How a reload ends, as its callers and `/status` are told: the result, and for any end but
//! success the refusal, typed by whose fault it is (the caller's input, sesame, the clock, Envoy),
//! so that the control API answers each with its own status code.

use serde::Serialize;

/// Why a reload did not happen (or did not succeed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The launcher is draining or stopping.
    ShuttingDown,
    /// The command is not Envoy: there is nothing to hot-restart.
    NotEnvoy,
    /// Hot restarts are blocked (a new epoch failed earlier); the reason.
    Blocked(String),
    /// The input is bad (certificates, bootstrap, what `envoy --mode validate` said): nothing was
    /// started.
    Invalid(String),
    /// sesame could not run a check (a validator that cannot be started, that survived SIGKILL, a
    /// base id it cannot read): nothing was started, and the input was not judged.
    Fault(String),
    /// A check or a wait ran past its time (a validator at `--reload-timeout`, a draining epoch past
    /// its parent shutdown time): nothing was started.
    TimedOut(String),
    /// A new epoch was started and failed; the serving epoch still serves.
    Failed(String),
}

impl Refusal {
    /// The word metrics and logs use for this kind of refusal.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::ShuttingDown => "shutting_down",
            Refusal::NotEnvoy => "not_envoy",
            Refusal::Blocked(_) => "blocked",
            Refusal::Invalid(_) => "invalid",
            Refusal::Fault(_) => "fault",
            Refusal::TimedOut(_) => "timed_out",
            Refusal::Failed(_) => "failed",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::ShuttingDown => f.write_str("shutting down"),
            Refusal::NotEnvoy => f.write_str("not Envoy"),
            Refusal::Blocked(why) => write!(f, "cannot hot-restart: {why}"),
            Refusal::Invalid(reason) | Refusal::Fault(reason) | Refusal::TimedOut(reason) | Refusal::Failed(reason) => {
                f.write_str(reason)
            }
        }
    }
}

/// How a reload (or a cold handover) ended, as `/status` and `sesame_reloads_total` say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReloadResult {
    /// The new epoch is LIVE.
    Success,
    /// Nothing was started: the checks (or the state of the launcher) said no.
    Refused,
    /// A new epoch was started and did not serve.
    Failed,
}

impl ReloadResult {
    pub fn label(self) -> &'static str {
        match self {
            ReloadResult::Success => "success",
            ReloadResult::Refused => "refused",
            ReloadResult::Failed => "failed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_serialises_as_its_label() {
        for result in [ReloadResult::Success, ReloadResult::Refused, ReloadResult::Failed] {
            assert_eq!(serde_json::to_value(result).expect("json"), serde_json::json!(result.label()));
        }
    }
}
