//! `--cert-reload in-place`: certificates swapped in the serving Envoy through file-based SDS, with
//! no new epoch. A touch of the watched files starts a short quiet wait; then one attempt
//! (`sds::attempt`, off the supervisor) reads each secret's files, writes those that changed and
//! pass the checks, and reads Envoy's answer back. While the files settle a state that fails is
//! waited on, not refused; at the debounce's end it is refused by name. One attempt at a time,
//! never beside a reload (whose new epoch is given the secrets as its own checks read them).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::served_files::ServedFiles;
use super::shutdown::Phase;
use super::touched::Named;
use super::{Event, Generation, Supervisor};
use crate::clock::unix_seconds;
use crate::launch::InPlace as InPlaceLaunch;
use crate::process::Processes;
use crate::sds::{CheckedSecret, Outcome, Prepared, SdsFiles};
use crate::status::{CertificateStatus, ReloadStatus};

/// From the last touch of a watched file to the attempt: the events of one write (or of a
/// `..data` swap) come together, and a write that is still going on shows as a PEM not whole.
pub(super) const QUIET: Duration = Duration::from_millis(10);

/// How long Envoy may take to say whether it took a secret.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// How a secret came to be what Envoy has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum How {
    /// Read by epoch 0 at its start.
    Start,
    /// Written for the epoch a reload started (and swapped in the epochs serving then).
    HotRestart,
    /// Swapped in place.
    InPlace,
}

/// One secret as Envoy has it.
#[derive(Debug, Clone)]
pub(super) struct Served {
    secret: CheckedSecret,
    how: How,
    at_unix: u64,
    /// What Envoy said of it: "confirmed", or why not (mostly a fixed text: a thousand pairs
    /// would hold a thousand copies).
    envoy: Cow<'static, str>,
    /// The last attempt that did not apply its files, if the files still fail (rare: boxed, it
    /// takes a word in each record).
    refused: Option<Box<ReloadStatus>>,
    /// The hash of the files Envoy rejected, while they hold that.
    rejected: Option<u64>,
}

impl AsRef<crate::sds::SecretFiles> for Served {
    fn as_ref(&self) -> &crate::sds::SecretFiles {
        &self.secret.secret.files
    }
}

/// The in-place state: what Envoy has, and the attempt under way or wanted.
#[derive(Debug)]
pub(super) struct InPlace {
    files: SdsFiles,
    /// `--cert-reload in-place`; otherwise the state only follows what hot restarts wrote.
    rotate: bool,
    served: Vec<Served>,
    /// `served` by its files.
    served_files: ServedFiles,
    quiet: Option<Generation>,
    running: Option<Generation>,
    /// An attempt is wanted (true: as at the debounce's end) once one may run.
    wanted: Option<bool>,
    /// Inline secrets written for an epoch that is not serving yet: what Envoy has once it is.
    pending: Option<Vec<Served>>,
    /// When files refused as not yet valid are tried again, as settled.
    retry: Option<Generation>,
    /// What the watcher named since the last attempt began: the secrets the next one reads.
    named: Named,
}

impl InPlace {
    pub fn new(launch: &mut InPlaceLaunch) -> InPlace {
        let served = launch.first.take().map(|first| first.secrets).unwrap_or_default();
        let at_unix = unix_seconds(SystemTime::now());
        let served: Vec<Served> = served
            .into_iter()
            .map(|secret| Served {
                secret: secret.into_record(),
                how: How::Start,
                at_unix,
                envoy: "read at start".into(),
                refused: None,
                rejected: None,
            })
            .collect();
        let rotate = launch.rotate_in_place;
        let mut in_place = InPlace {
            files: launch.files.clone(),
            rotate,
            served: Vec::new(),
            served_files: ServedFiles::default(),
            quiet: None,
            running: None,
            wanted: None,
            pending: None,
            retry: None,
            named: Named::default(),
        };
        in_place.serve(served);
        in_place
    }

    /// `served` and its index, always set together.
    fn serve(&mut self, served: Vec<Served>) {
        self.served_files = ServedFiles::of(&served);
        self.served = served;
    }

    /// Whether every one of `paths` is a file of a secret: a change of them alone is a rotation.
    pub fn only_secret_files(&self, paths: &[PathBuf]) -> bool {
        !paths.is_empty() && paths.iter().all(|path| self.served_files.holds(&self.served, path))
    }

    /// Whether an attempt is under way.
    #[cfg(test)]
    pub fn attempt_running(&self) -> bool {
        self.running.is_some()
    }

    #[cfg(test)]
    pub fn running_attempt(&self) -> Option<Generation> {
        self.running
    }

    /// `/status`'s certificates.
    pub fn report(&self) -> Vec<CertificateStatus> {
        self.served
            .iter()
            .map(|served| {
                let files = served.secret.secret.files.paths();
                CertificateStatus {
                    path: served.secret.path().display().to_string(),
                    key: files.get(1).filter(|_| served.secret.leaf.is_some()).map(|k| k.display().to_string()),
                    secret: served.secret.secret.name.clone(),
                    serial: served.secret.leaf.as_ref().map(|(serial, _)| serial.clone()),
                    not_after_unix: served.secret.leaf.as_ref().map(|(_, not_after)| *not_after),
                    rotated: match served.how {
                        How::Start => "start",
                        How::HotRestart => "hot-restart",
                        How::InPlace => "in-place",
                    },
                    rotated_at_unix: served.at_unix,
                    envoy: served.envoy.to_string(),
                    refused: served.refused.as_deref().cloned(),
                }
            })
            .collect()
    }
}

impl<P: Processes> Supervisor<P> {
    /// A watched file was touched: an attempt after the quiet wait.
    pub(super) fn on_secret_files_touched(&mut self, touched: crate::watch::Touched) {
        // Nothing served by SDS yet (the certificates failed at start): a reload will give them.
        let Some(in_place) = self.in_place.as_mut().filter(|i| i.rotate && !i.served.is_empty()) else { return };
        in_place.named.add(touched);
        in_place.quiet = Some(self.timers.schedule(QUIET));
    }

    /// The quiet wait `generation` ran out; false when it is not its.
    pub(super) fn on_rotation_deadline(&mut self, generation: Generation) -> bool {
        let Some(in_place) = self.in_place.as_mut() else { return false };
        let settled = if in_place.quiet == Some(generation) {
            in_place.quiet = None;
            false
        } else if in_place.retry == Some(generation) {
            in_place.retry = None;
            true
        } else {
            return false;
        };
        self.want_rotation(settled);
        true
    }

    /// The debounce ended with only secret files changed (or touched again): the attempt that
    /// refuses what still fails. True when in-place took the change.
    pub(super) fn rotate_settled(&mut self, changed: &[PathBuf]) -> bool {
        let Some(in_place) = self.in_place.as_ref().filter(|i| i.rotate) else { return false };
        let refused = in_place.served.iter().any(|s| s.refused.is_some());
        if !(in_place.only_secret_files(changed) || (changed.is_empty() && refused)) {
            return false;
        }
        if let Some(in_place) = self.in_place.as_mut() {
            changed.iter().for_each(|path| in_place.named.add_path(path));
        }
        self.want_rotation(true);
        true
    }

    fn want_rotation(&mut self, settled: bool) {
        let Some(in_place) = self.in_place.as_mut() else { return };
        in_place.wanted = Some(settled || in_place.wanted.unwrap_or(false));
        self.rotate_when_possible();
    }

    /// Starts the attempt wanted, if one may run now: Envoy serving (a drain's too), no reload, no
    /// other attempt. Called after every event.
    pub(super) fn rotate_when_possible(&mut self) {
        // A drain takes up to --drain-timeout, and the clients that still connect meanwhile get the
        // new certificate; once Envoy is told to stop, nothing is swapped.
        let wanted = self.in_place.as_ref().is_some_and(|i| i.wanted.is_some() && i.running.is_none());
        let serving = matches!(self.phase, Phase::Running | Phase::Draining { .. });
        if !(wanted && serving && self.reload.is_idle() && self.epochs.current_is_live()) {
            return;
        }
        let admin = self.epochs.current_admin();
        let user = self.launch.user.clone();
        let Some(in_place) = self.in_place.as_mut() else { return };
        let (Some(settled), Some(admin)) = (in_place.wanted, admin) else { return };
        in_place.wanted = None;
        let attempt = self.timers.next();
        in_place.running = Some(attempt);
        // Read again: what the events named, and what is still refused (its files may hold a
        // state that passes now, or at the debounce's end).
        let named = in_place.named.take();
        let mut read = in_place.served_files.named(&in_place.served, &named);
        let refused = in_place.served.iter().enumerate().filter(|(_, s)| s.refused.is_some()).map(|(i, _)| i);
        read.extend(refused);
        read.sort_unstable();
        read.dedup();
        let served: Vec<(CheckedSecret, Option<u64>)> =
            read.into_iter().map(|i| &in_place.served[i]).map(|s| (s.secret.clone(), s.rejected)).collect();
        let events = self.events.clone();
        let names: Vec<String> = served.iter().map(|(s, _)| s.secret.name.clone()).collect();
        tokio::spawn(async move {
            let outcomes = crate::sds::attempt(served, settled, admin, user, CONFIRM_TIMEOUT).await;
            let outcomes = names.into_iter().zip(outcomes).collect();
            let _ = events.send(Event::Rotated { attempt, outcomes });
        });
    }

    /// The attempt `attempt` ended: what Envoy has now, one log line per secret that changed.
    pub(super) fn on_rotated(&mut self, attempt: Generation, outcomes: Vec<(String, Outcome)>) {
        let Some(in_place) = self.in_place.as_mut().filter(|i| i.running == Some(attempt)) else { return };
        in_place.running = None;
        let now = unix_seconds(SystemTime::now());
        let mut unconfirmed = None;
        let mut valid_from = None;
        // The served secrets the outcomes are for (one a reload dropped meanwhile has none now),
        // found without indexing every served secret anew at each attempt.
        let mut outcomes: HashMap<String, Outcome> = outcomes.into_iter().collect();
        let mut found = Vec::with_capacity(outcomes.len());
        for (i, served) in in_place.served.iter().enumerate() {
            if outcomes.is_empty() {
                break;
            }
            if let Some(outcome) = outcomes.remove(&served.secret.secret.name) {
                found.push((i, outcome));
            }
        }
        for (i, outcome) in found {
            let served = &mut in_place.served[i];
            let path = served.secret.path().display().to_string();
            let refuse = |served: &mut Served, detail: String| {
                served.refused = Some(Box::new(ReloadStatus {
                    result: crate::outcome::ReloadResult::Refused,
                    detail,
                    at_unix: now,
                }));
            };
            match outcome {
                Outcome::Unchanged => {
                    served.refused = None;
                    served.rejected = None;
                }
                Outcome::StillRejected => {}
                Outcome::Waiting(why) => tracing::debug!("in place: {path} is not applied yet: {why}"),
                Outcome::Refused(e) => {
                    if let crate::certs::CertError::NotYetValid { from_unix, .. } = &e {
                        // Issued by a clock ahead of ours: tried again once it is valid.
                        valid_from = Some(*from_unix);
                    }
                    tracing::error!("in place: {e}: Envoy keeps serving {}", describe(&served.secret));
                    self.metrics.rotation("in_place", "refused");
                    refuse(served, e.to_string());
                }
                Outcome::Failed(why) => {
                    tracing::error!("in place: {why}: Envoy keeps serving {}", describe(&served.secret));
                    self.metrics.rotation("in_place", "failed");
                    refuse(served, why);
                }
                Outcome::Rejected(secret) => {
                    let why =
                        format!("Envoy rejected {} (sds.{}.update_rejected)", describe(&secret), secret.secret.name);
                    tracing::error!("in place: {why}: it keeps serving {}", describe(&served.secret));
                    self.metrics.rotation("in_place", "rejected");
                    served.rejected = Some(secret.files_hash);
                    refuse(served, why);
                }
                Outcome::Rotated(secret) => {
                    let was = served.secret.leaf.as_ref().map(|(serial, _)| format!(" (was serial {serial})"));
                    tracing::info!("in place: Envoy serves {}{}", describe(&secret), was.unwrap_or_default());
                    self.metrics.rotation("in_place", "success");
                    *served = Served {
                        secret: secret.without_bytes(),
                        how: How::InPlace,
                        at_unix: now,
                        envoy: "confirmed".into(),
                        refused: None,
                        rejected: None,
                    };
                }
                Outcome::Unconfirmable(secret) => {
                    let why = "written; Envoy keeps no sds.* stats (its stats_matcher) to confirm it";
                    tracing::info!("in place: {} {why}", describe(&secret));
                    self.metrics.rotation("in_place", "unconfirmable");
                    let secret = secret.without_bytes();
                    let envoy = why.into();
                    *served = Served { secret, how: How::InPlace, at_unix: now, envoy, refused: None, rejected: None };
                }
                Outcome::Unconfirmed(secret, why) => {
                    tracing::warn!("in place: {} written; {why}: a hot restart gives it instead", describe(&secret));
                    self.metrics.rotation("in_place", "unconfirmed");
                    unconfirmed = Some(describe(&secret));
                    let secret = secret.without_bytes();
                    *served = Served {
                        secret,
                        how: How::InPlace,
                        at_unix: now,
                        envoy: why.into(),
                        refused: None,
                        rejected: None,
                    };
                }
            }
            if let Some((_, not_after)) = served.secret.leaf {
                self.metrics.certificate_expires(served.secret.path(), not_after);
            }
        }
        if let Some(from) = valid_from {
            let wait = (from - now as i64).max(0) as u64 + 1;
            if let Some(in_place) = self.in_place.as_mut() {
                in_place.retry = Some(self.timers.schedule(Duration::from_secs(wait)));
            }
        }
        if let Some(secret) = unconfirmed {
            let _ = self.request_reload(super::trigger::Trigger::Unconfirmed { secret });
        }
        self.rotate_when_possible();
    }

    /// A new epoch is about to start on `prepared` (its checks read and checked it): the secrets
    /// are written, for it and for the epoch that serves now.
    pub(super) fn write_epoch_secrets(&mut self, prepared: &Prepared) -> anyhow::Result<()> {
        let Some(in_place) = self.in_place.as_mut() else { return Ok(()) };
        in_place.files.write(prepared, self.launch.user.as_ref())?;
        if let Some(launch) = self.launch.envoy.as_mut().and_then(|e| e.sds.as_mut()).filter(|s| !s.active) {
            launch.active = true;
            tracing::info!(
                "the certificates passed the checks: from epoch {} on, Envoy gets them as checked",
                self.epochs.next_number()
            );
        }
        let now = unix_seconds(SystemTime::now());
        let epoch = self.epochs.next_number();
        let mut served = Vec::with_capacity(prepared.secrets.len());
        let had: HashMap<u64, &Served> = in_place.served.iter().map(|s| (s.secret.resource_hash, s)).collect();
        for secret in &prepared.secrets {
            let kept = had.get(&secret.resource_hash).map(|&s| s.clone());
            served.push(kept.unwrap_or_else(|| Served {
                secret: secret.without_bytes(),
                how: How::HotRestart,
                at_unix: now,
                envoy: format!("written for epoch {epoch}").into(),
                refused: None,
                rejected: None,
            }));
        }
        if in_place.files.inline {
            // Only the new epoch has them: true once it serves.
            in_place.pending = Some(served);
        } else {
            // By SDS, the epochs that serve swap them now.
            self.now_served(served);
        }
        Ok(())
    }

    /// The epoch a reload started serves (a hot restart's, or a new family's): so do the inline
    /// secrets written for it. With `false`, it failed, and what the serving epoch has stays.
    pub(super) fn new_epoch_serves(&mut self, serves: bool) {
        if let Some(wanted) = self.in_place.as_mut().and_then(|i| i.wanted.as_mut()) {
            // The reload read the files; an attempt wanted since the debounce's end may find them
            // changing again: only the next debounce's end refuses.
            *wanted = false;
        }
        let Some(pending) = self.in_place.as_mut().and_then(|i| i.pending.take()) else { return };
        if serves {
            self.now_served(pending);
        }
    }

    fn now_served(&mut self, served: Vec<Served>) {
        let Some(in_place) = self.in_place.as_mut() else { return };
        for secret in &served {
            if let Some((_, not_after)) = secret.secret.leaf {
                self.metrics.certificate_expires(secret.secret.path(), not_after);
            }
        }
        let still: HashSet<&Path> = served.iter().map(|s| s.secret.path()).collect();
        for gone in in_place.served.iter().filter(|s| !still.contains(s.secret.path())) {
            self.metrics.forget_certificate(gone.secret.path());
        }
        in_place.serve(served);
    }

    pub(super) fn rotates_in_place(&self) -> bool {
        self.in_place.as_ref().is_some_and(|i| i.rotate)
    }

    /// Each certificate's notAfter, as it stands.
    pub(super) fn export_expiry(&self) {
        for served in self.in_place.iter().flat_map(|i| &i.served) {
            if let Some((_, not_after)) = served.secret.leaf {
                self.metrics.certificate_expires(served.secret.path(), not_after);
            }
        }
    }

    pub(super) fn remove_secrets(&self) {
        if let Some(in_place) = &self.in_place {
            in_place.files.remove();
        }
    }
}

/// A secret as the log names it: its file and, for a certificate, its serial.
fn describe(secret: &CheckedSecret) -> String {
    match &secret.leaf {
        Some((serial, _)) => format!("{} (serial {serial})", secret.path().display()),
        None => format!("the CA bundle {}", secret.path().display()),
    }
}
