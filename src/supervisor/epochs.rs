//! The live Envoy processes (epochs) and which one serves. For a plain command, the command is
//! epoch 0 and the only one.

use std::time::SystemTime;

use nix::unistd::Pid;
use tokio::time::Instant;

use crate::admin::{AdminAddress, AdminClient};
use crate::http::{Endpoint, KeptConnection};
use crate::process::{Processes, signal_name};

/// One Envoy process (or, for a plain command, the command itself as epoch 0).
#[derive(Debug)]
pub struct Epoch {
    /// The launcher's number for it: one above every epoch before it, across families.
    pub number: u32,
    /// Its hot-restart family: 0 for the first, one more for each cold handover.
    pub family: u32,
    /// Its `--restart-epoch` within its family.
    pub restart_epoch: u32,
    pub pid: Pid,
    pub started: Instant,
    pub started_at: SystemTime,
    /// Its admin answered LIVE as this epoch (for a plain command or without admin: from the start).
    pub live: bool,
    /// It was sent the stop signal: never twice, since a second SIGTERM during its shutdown finds
    /// Envoy's handler gone and kills it (status 143).
    stopped: bool,
    /// Signals to pass on once it is LIVE: before, its handlers may not be installed, and a signal
    /// whose default action is to terminate (SIGUSR1 from logrotate, say) would kill it.
    held: Vec<i32>,
    /// Where its admin is, from the bootstrap it was started with.
    pub admin: Option<AdminAddress>,
    /// The address its admin answered LIVE on (for an admin on port 0, read from its file).
    pub admin_answered: Option<Endpoint>,
    /// A connection to its admin opened once it was LIVE, for when its admin listener is gone.
    pub admin_kept: KeptConnection,
}

impl Epoch {
    pub fn new(number: u32, pid: Pid, live: bool) -> Epoch {
        Epoch {
            number,
            family: 0,
            restart_epoch: number,
            pid,
            started: Instant::now(),
            started_at: SystemTime::now(),
            live,
            stopped: false,
            held: vec![],
            admin: None,
            admin_answered: None,
            admin_kept: KeptConnection::default(),
        }
    }

    pub fn with_admin(self, admin: Option<AdminAddress>) -> Epoch {
        Epoch { admin, ..self }
    }

    /// Restart epoch `restart_epoch` of family `family`.
    pub fn in_family(self, family: u32, restart_epoch: u32) -> Epoch {
        Epoch { family, restart_epoch, ..self }
    }

    /// Its admin: where it answered LIVE, or where its bootstrap says it is.
    pub fn admin_client(&self) -> Option<AdminClient> {
        let endpoint = self.admin_answered.clone().or_else(|| self.admin.as_ref()?.resolve())?;
        Some(AdminClient::new(endpoint).with_kept(self.admin_kept.clone()))
    }

    /// Its admin over the connection kept to it alone: its address may be a newer epoch's now.
    pub fn kept_admin_client(&self) -> Option<AdminClient> {
        let endpoint = self.admin_answered.clone().or_else(|| self.admin.as_ref()?.resolve())?;
        Some(AdminClient::kept_only(endpoint, self.admin_kept.clone()))
    }
}

/// The live epochs, oldest first, and the number of the current one: the one that serves, whose
/// exit ends the launcher. Around a hot restart there are two: an older one that drains and the
/// current one, or the current one and a newer one that starts.
#[derive(Debug)]
pub struct Epochs {
    list: Vec<Epoch>,
    current: u32,
}

impl Epochs {
    pub fn new(first: Epoch) -> Epochs {
        Epochs { current: first.number, list: vec![first] }
    }

    pub fn current_number(&self) -> u32 {
        self.current
    }

    pub fn current_is_live(&self) -> bool {
        self.find(self.current).is_some_and(|e| e.live)
    }

    /// An older epoch of the current family that still drains after a hot restart.
    pub fn older(&self) -> Option<&Epoch> {
        let family = self.current_family();
        self.list.iter().find(|e| e.number < self.current && e.family == family)
    }

    #[cfg(test)]
    pub fn find_pid(&self, pid: Pid) -> Option<&Epoch> {
        self.list.iter().find(|e| e.pid == pid)
    }

    pub fn find(&self, number: u32) -> Option<&Epoch> {
        self.list.iter().find(|e| e.number == number)
    }

    /// The admin of the epoch that serves.
    pub fn current_admin(&self) -> Option<AdminClient> {
        self.find(self.current)?.admin_client()
    }

    /// Records where `number`'s admin answered LIVE.
    pub fn answered_on(&mut self, number: u32, endpoint: Endpoint) {
        if let Some(epoch) = self.list.iter_mut().find(|e| e.number == number) {
            epoch.admin_answered = Some(endpoint);
        }
    }

    /// The family of the epoch that serves.
    pub fn current_family(&self) -> u32 {
        self.find(self.current).map_or(0, |e| e.family)
    }

    /// The `--restart-epoch` of the next hot restart: one above the current family's newest.
    pub fn next_restart_epoch(&self) -> u32 {
        let family = self.current_family();
        self.list.iter().filter(|e| e.family == family).map(|e| e.restart_epoch + 1).max().unwrap_or(0)
    }

    /// The epochs of families older than the current one (during a cold handover).
    pub fn of_older_families(&self) -> impl Iterator<Item = &Epoch> {
        let family = self.current_family();
        self.list.iter().filter(move |e| e.family < family)
    }

    /// Sends `sig` to the newest epoch of each family older than the current one that was not sent
    /// its stop signal yet: the newest of a family tells its parent to terminate.
    pub fn stop_older_families(&mut self, processes: &mut impl Processes, sig: i32) {
        let family = self.current_family();
        let mut families: Vec<u32> = self.list.iter().filter(|e| e.family < family).map(|e| e.family).collect();
        families.dedup();
        for old in families {
            if let Some(newest) =
                self.list.iter_mut().filter(|e| e.family == old && !e.stopped).max_by_key(|e| e.number)
            {
                newest.stopped = true;
                processes.signal(newest.pid, sig);
            }
        }
    }

    /// The number the next epoch gets: one above every epoch started so far.
    pub fn next_number(&self) -> u32 {
        self.list.iter().map(|e| e.number).max().unwrap_or(self.current).max(self.current) + 1
    }

    pub fn add(&mut self, epoch: Epoch) {
        self.list.push(epoch);
    }

    /// Takes out the epoch with this pid, once it has exited.
    pub fn remove(&mut self, pid: Pid) -> Option<Epoch> {
        let i = self.list.iter().position(|e| e.pid == pid)?;
        Some(self.list.remove(i))
    }

    /// Marks `number` LIVE and passes on the signals held for it; returns it unless it was LIVE
    /// already.
    pub fn mark_live(&mut self, number: u32, processes: &mut impl Processes) -> Option<&Epoch> {
        let epoch = self.list.iter_mut().find(|e| e.number == number && !e.live)?;
        epoch.live = true;
        for sig in std::mem::take(&mut epoch.held) {
            tracing::info!("epoch {number} is LIVE: passing on the {} held for it", signal_name(sig));
            processes.signal(epoch.pid, sig);
        }
        Some(epoch)
    }

    /// A new epoch answered LIVE: it serves from now on.
    pub fn promote(&mut self, number: u32, processes: &mut impl Processes) {
        self.mark_live(number, processes);
        self.current = number;
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Epoch> {
        self.list.iter()
    }

    pub fn signal_all(&self, processes: &mut impl Processes, sig: i32) {
        for epoch in &self.list {
            processes.signal(epoch.pid, sig);
        }
    }

    /// Passes a user's signal on to every epoch; one that is not LIVE yet gets it when it is.
    pub fn forward_to_all(&mut self, processes: &mut impl Processes, sig: i32) {
        for epoch in &mut self.list {
            forward(epoch, processes, sig);
        }
    }

    /// Passes a user's signal on to the current epoch, or holds it until the epoch is LIVE.
    pub fn forward_to_current(&mut self, processes: &mut impl Processes, sig: i32) {
        let current = self.current;
        if let Some(epoch) = self.list.iter_mut().find(|e| e.number == current) {
            forward(epoch, processes, sig);
        }
    }

    pub fn signal_newest(&self, processes: &mut impl Processes, sig: i32) {
        if let Some(newest) = self.list.iter().max_by_key(|e| e.number) {
            processes.signal(newest.pid, sig);
        }
    }

    /// Sends `sig` to the newest epoch that has not been sent its stop signal yet. Only the newest:
    /// an Envoy that shuts down tells its parent epoch to terminate, and aborts when that parent is
    /// already gone; so the parent is left to it.
    pub fn stop_newest(&mut self, processes: &mut impl Processes, sig: i32) {
        if let Some(newest) = self.list.iter_mut().filter(|e| !e.stopped).max_by_key(|e| e.number) {
            newest.stopped = true;
            processes.signal(newest.pid, sig);
        }
    }
}

fn forward(epoch: &mut Epoch, processes: &mut impl Processes, sig: i32) {
    if epoch.live {
        processes.signal(epoch.pid, sig);
    } else if !epoch.held.contains(&sig) {
        // Like the kernel, one pending instance of each signal.
        tracing::info!("{} held for epoch {} until it is LIVE", signal_name(sig), epoch.number);
        epoch.held.push(sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pid(n: i32) -> Pid {
        Pid::from_raw(n)
    }

    #[test]
    fn the_current_epoch_changes_only_when_promoted() {
        let mut epochs = Epochs::new(Epoch::new(0, pid(10), false));
        assert!(!epochs.current_is_live());
        let mut processes = Recorded::default();
        assert_eq!(epochs.mark_live(0, &mut processes).map(|e| e.pid), Some(pid(10)));
        assert!(epochs.mark_live(0, &mut processes).is_none(), "LIVE once");
        assert_eq!(epochs.next_number(), 1);
        epochs.add(Epoch::new(1, pid(11), false));
        assert_eq!((epochs.current_number(), epochs.next_number()), (0, 2));
        assert!(epochs.older().is_none(), "a starting epoch is newer, not older");
        epochs.promote(1, &mut processes);
        assert_eq!(epochs.current_number(), 1);
        assert!(epochs.current_is_live());
        assert_eq!(epochs.older().map(|e| e.number), Some(0));
        assert_eq!(epochs.remove(pid(10)).map(|e| e.number), Some(0));
        assert!(epochs.remove(pid(10)).is_none());
        assert_eq!((epochs.len(), epochs.next_number()), (1, 2));
    }

    #[test]
    fn a_failed_epoch_leaves_its_number_used() {
        let mut epochs = Epochs::new(Epoch::new(0, pid(10), true));
        epochs.add(Epoch::new(1, pid(11), false));
        epochs.remove(pid(11));
        assert_eq!(epochs.next_number(), 1, "no epoch 1 ran to the end: the number is free again");
    }

    /// Records the signals sent.
    #[derive(Default)]
    struct Recorded(Vec<(Pid, i32)>);

    impl Processes for Recorded {
        fn spawn(
            &mut self,
            _: &[std::ffi::OsString],
            _: bool,
            _: Option<std::fs::File>,
        ) -> Result<Pid, crate::process::SpawnError> {
            unreachable!("epochs never spawn")
        }
        fn signal(&mut self, pid: Pid, sig: i32) {
            self.0.push((pid, sig));
        }
        fn signal_group(&mut self, _: Pid, _: i32) {
            unreachable!("epochs are signalled one by one")
        }
        fn reap(&mut self) -> crate::process::Reaped {
            unreachable!("epochs never reap")
        }
        fn signal_descendants(&mut self, _: nix::sys::signal::Signal) {}
        fn suspend(&mut self) {}
        fn resume(&mut self) {}
    }

    #[test]
    fn signals_for_an_epoch_that_is_not_live_wait_for_it() {
        let mut processes = Recorded::default();
        let mut epochs = Epochs::new(Epoch::new(0, pid(10), true));
        epochs.add(Epoch::new(1, pid(11), false));
        epochs.forward_to_all(&mut processes, libc::SIGUSR1);
        epochs.forward_to_all(&mut processes, libc::SIGUSR1);
        epochs.forward_to_all(&mut processes, libc::SIGUSR2);
        assert_eq!(processes.0, vec![(pid(10), libc::SIGUSR1), (pid(10), libc::SIGUSR1), (pid(10), libc::SIGUSR2)]);
        processes.0.clear();
        epochs.promote(1, &mut processes);
        assert_eq!(processes.0, vec![(pid(11), libc::SIGUSR1), (pid(11), libc::SIGUSR2)], "once each, in order");
        processes.0.clear();
        epochs.forward_to_current(&mut processes, libc::SIGWINCH);
        assert_eq!(processes.0, vec![(pid(11), libc::SIGWINCH)]);
        epochs.signal_all(&mut processes, libc::SIGKILL);
        assert_eq!(processes.0.len(), 3, "SIGKILL is never held");
    }
}
