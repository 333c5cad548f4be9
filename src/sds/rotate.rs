//! One in-place rotation attempt: the secrets' files read again, each that changed and passes the
//! checks written for Envoy, and Envoy's answer read back. Off the supervisor: it reports what
//! happened to each secret, and the supervisor records it.

use std::time::{Duration, SystemTime};

use super::{CheckedSecret, check_secret, write_secret};
use crate::admin::{AdminClient, SdsUpdates};
use crate::certs::CertError;
use crate::user::EnvoyUser;

/// Between two looks at Envoy's counters while a swap is confirmed.
const CONFIRM_POLL: Duration = Duration::from_millis(10);

/// What an attempt did with one secret (by its index in what was served).
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Its files hold what Envoy has.
    Unchanged,
    /// The files are in a state that is not applied yet (while they settle): a pair that does not
    /// match, a PEM not whole, a file with fewer certificates than the one served.
    Waiting(String),
    /// Once the files settled, they fail the checks: nothing was written.
    Refused(CertError),
    /// Written, and Envoy took it: its update counter moved (and `/certs` shows the new serial).
    Rotated(CheckedSecret),
    /// Written, and Envoy rejected it (`update_rejected` moved): the previous bytes were written
    /// back, so that the next epoch starts on what Envoy serves.
    Rejected(CheckedSecret),
    /// Written, but Envoy said nothing of it within the timeout.
    Unconfirmed(CheckedSecret, String),
    /// The secret file could not be written.
    Failed(String),
}

/// What an attempt does with a secret's files as they are now.
enum Next {
    Keep,
    Write(CheckedSecret),
    Not(Outcome),
}

/// What the secret `served` becomes, from its files as they are now. `settled`: the debounce
/// ended, and a state that passes the checks is applied even when it holds fewer certificates.
fn next_state(served: &CheckedSecret, settled: bool, now: SystemTime) -> Next {
    let checked = match check_secret(&served.secret, now) {
        Ok(checked) => checked,
        Err(e) if settled => return Next::Not(Outcome::Refused(e)),
        Err(e) => return Next::Not(Outcome::Waiting(e.to_string())),
    };
    if checked.resource == served.resource {
        return Next::Keep;
    }
    if checked.certificates < served.certificates && !settled {
        let why = format!(
            "{} holds {} certificates, {} before: applied once the files settle",
            checked.path().display(),
            checked.certificates,
            served.certificates
        );
        return Next::Not(Outcome::Waiting(why));
    }
    Next::Write(checked)
}

/// Reads every served secret's files, writes those that changed and pass, and confirms each with
/// Envoy's admin within `timeout`. Returns one outcome per served secret, in order.
pub async fn attempt(
    served: Vec<CheckedSecret>,
    settled: bool,
    admin: AdminClient,
    user: Option<EnvoyUser>,
    timeout: Duration,
) -> Vec<Outcome> {
    // Before anything is written: each swap is known by the counter it moves past this.
    let before = admin.sds_updates().await.unwrap_or_default();
    let written = tokio::task::spawn_blocking(move || {
        let now = SystemTime::now();
        let outcomes: Vec<(CheckedSecret, Next)> = served
            .into_iter()
            .map(|served| {
                let next = match next_state(&served, settled, now) {
                    Next::Write(next) => match write_secret(&next, user.as_ref()) {
                        Ok(()) => Next::Write(next),
                        Err(e) => Next::Not(Outcome::Failed(format!("{e:#}"))),
                    },
                    other => other,
                };
                (served, next)
            })
            .collect();
        (outcomes, user)
    })
    .await;
    let Ok((outcomes, user)) = written else { return Vec::new() };
    let mut pending: Vec<(usize, CheckedSecret)> = Vec::new();
    let mut result: Vec<Outcome> = Vec::with_capacity(outcomes.len());
    let mut previous: Vec<CheckedSecret> = Vec::with_capacity(outcomes.len());
    for (index, (served, next)) in outcomes.into_iter().enumerate() {
        result.push(match next {
            Next::Keep => Outcome::Unchanged,
            Next::Write(next) => {
                pending.push((index, next.clone()));
                Outcome::Unconfirmed(next, String::new())
            }
            Next::Not(outcome) => outcome,
        });
        previous.push(served);
    }
    confirm(&admin, &before, pending, &mut result, timeout).await;
    let rejected: Vec<CheckedSecret> = result
        .iter()
        .enumerate()
        .filter(|(_, outcome)| matches!(outcome, Outcome::Rejected(_)))
        .map(|(index, _)| previous[index].clone())
        .collect();
    if !rejected.is_empty() {
        let _ = tokio::task::spawn_blocking(move || {
            for served in &rejected {
                if let Err(e) = write_secret(served, user.as_ref()) {
                    tracing::error!("cannot write back the secret Envoy serves: {e:#}");
                }
            }
        })
        .await;
    }
    result
}

/// Waits until Envoy has said, of every `pending` secret, whether it took it: its
/// `update_rejected` or `update_success` past `before`, and for a certificate, its serial in
/// `/certs`.
async fn confirm(
    admin: &AdminClient,
    before: &std::collections::BTreeMap<String, SdsUpdates>,
    mut pending: Vec<(usize, CheckedSecret)>,
    result: &mut [Outcome],
    timeout: Duration,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut taken: Vec<(usize, CheckedSecret)> = Vec::new();
    while !(pending.is_empty() && taken.is_empty()) {
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(CONFIRM_POLL).await;
        if !pending.is_empty()
            && let Ok(now) = admin.sds_updates().await
        {
            pending.retain(|(index, secret)| {
                let was = before.get(&secret.secret.name).copied().unwrap_or_default();
                let is = now.get(&secret.secret.name).copied().unwrap_or_default();
                if is.rejected > was.rejected {
                    result[*index] = Outcome::Rejected(secret.clone());
                    false
                } else if is.success > was.success {
                    taken.push((*index, secret.clone()));
                    false
                } else {
                    true
                }
            });
        }
        if !taken.is_empty()
            && let Ok(serials) = admin.served_serials().await
        {
            taken.retain(|(index, secret)| {
                let shown = secret.leaf.as_ref().is_none_or(|(serial, _)| serials.contains(serial));
                if shown {
                    result[*index] = Outcome::Rotated(secret.clone());
                }
                !shown
            });
        }
    }
    for (index, _) in &pending {
        if let Outcome::Unconfirmed(_, why) = &mut result[*index] {
            *why = format!("Envoy's sds update counters did not move within {timeout:?}");
        }
    }
    for (index, secret) in &taken {
        let serial = secret.leaf.as_ref().map(|(serial, _)| serial.as_str()).unwrap_or_default();
        result[*index] = Outcome::Unconfirmed(
            secret.clone(),
            format!(
                "Envoy took it (sds.{}.update_success), yet /certs did not show serial {serial} within {timeout:?}",
                secret.secret.name
            ),
        );
    }
}
