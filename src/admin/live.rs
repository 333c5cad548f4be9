//! Waiting for an epoch to be LIVE: its admin is asked until it answers as that restart epoch of
//! that family in state LIVE.

use std::time::Duration;

use super::{AdminAddress, AdminClient, Family};
use crate::http::Endpoint;

/// How often a starting epoch's admin is asked whether it is LIVE: often while a start usually
/// ends (Envoy on a plain bootstrap is LIVE within 50-100 ms, and each poll's wait is added to the
/// start and to every reload), then less, for an epoch that waits on xDS.
const LIVE_POLL_FAST: Duration = Duration::from_millis(5);
const LIVE_POLL: Duration = Duration::from_millis(50);
const LIVE_POLL_FAST_FOR: Duration = Duration::from_secs(2);

/// Why an epoch was not seen LIVE.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotLive {
    #[error("epoch {epoch} was superseded by epoch {by} before it was LIVE")]
    Superseded { epoch: u32, by: u32 },
    #[error(
        "epoch {epoch} was still {state} after {timeout:?} (--reload-timeout; an xDS server's initial_fetch_timeout \
         longer than it needs a longer one)"
    )]
    StillStarting { epoch: u32, state: String, timeout: Duration },
    #[error("epoch {epoch} did not answer on {address} within {timeout:?}")]
    NoAnswer { epoch: u32, address: String, timeout: Duration },
    /// Told by the supervisor, not the poll: the epoch exited first.
    #[error("it exited with {0} before it was LIVE")]
    Exited(String),
}

/// Polls `address` until it answers as `epoch` of `family` in state LIVE, or `timeout` passes
/// (None: no limit); returns the address it answered on.
pub async fn await_live(
    address: AdminAddress,
    epoch: u32,
    family: Family,
    timeout: Option<Duration>,
) -> Result<Endpoint, NotLive> {
    // Also ends when a later epoch holds the admin: this one will never answer there again, and a
    // poll that never ends would wake the launcher 20 times a second for good.
    let last_state = std::sync::Mutex::new(None::<String>);
    let started = tokio::time::Instant::now();
    let poll = async {
        loop {
            // An admin on port 0 is found once Envoy has written its address; an Envoy of another
            // family on the same address (one still dying, another launcher's) is no answer at all.
            let endpoint = address.resolve();
            let answer = match &endpoint {
                Some(endpoint) => AdminClient::new(endpoint.clone()).server_info().await.ok(),
                None => None,
            };
            if let (Some(endpoint), Some(info)) = (endpoint, answer)
                && family.owns(&info.family)
            {
                if info.restart_epoch == epoch && info.state == "LIVE" {
                    return Ok(endpoint);
                }
                if info.restart_epoch == epoch {
                    *last_state.lock().unwrap_or_else(|p| p.into_inner()) = Some(info.state);
                }
                if info.restart_epoch > epoch {
                    return Err(NotLive::Superseded { epoch, by: info.restart_epoch });
                }
            }
            let every = if started.elapsed() < LIVE_POLL_FAST_FOR { LIVE_POLL_FAST } else { LIVE_POLL };
            tokio::time::sleep(every).await;
        }
    };
    let Some(timeout) = timeout else { return poll.await };
    match tokio::time::timeout(timeout, poll).await {
        Ok(result) => result,
        Err(_) => {
            // Not LIVE in time; but once it has started its workers it has told the old epoch to
            // drain its listeners, and it is the one that serves: it must not be killed then.
            let serving = match address.resolve() {
                Some(endpoint) => {
                    AdminClient::new(endpoint.clone()).workers_started().await.is_ok_and(|s| s).then_some(endpoint)
                }
                None => None,
            };
            match serving {
                Some(endpoint) => {
                    tracing::warn!(
                        "epoch {epoch} was not LIVE within {timeout:?}, but it has started its workers and serves"
                    );
                    Ok(endpoint)
                }
                None => {
                    let last = last_state.lock().unwrap_or_else(|p| p.into_inner()).take();
                    Err(match last {
                        Some(state) => NotLive::StillStarting { epoch, state, timeout },
                        None => NotLive::NoAnswer { epoch, address: address.to_string(), timeout },
                    })
                }
            }
        }
    }
}
