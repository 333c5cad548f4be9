//! systemd's notify protocol: READY, RELOADING (with MONOTONIC_USEC, as Type=notify-reload wants),
//! STOPPING, STATUS lines for `systemctl status`, and watchdog pings while Envoy answers its admin
//! API. Everything here is a no-op when NOTIFY_SOCKET is not set.

use std::time::Duration;

use sd_notify::NotifyState;

use crate::admin::AdminClient;

#[derive(Debug, Clone, Copy)]
pub struct Notifier {
    enabled: bool,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        Notifier { enabled: std::env::var_os("NOTIFY_SOCKET").is_some() }
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if self.enabled
            && let Err(e) = sd_notify::notify(states)
        {
            tracing::warn!("cannot notify systemd: {e}");
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn reloading(&self, status: &str) {
        self.send(&[
            NotifyState::Reloading,
            NotifyState::monotonic_usec_now().unwrap_or(NotifyState::Reloading),
            NotifyState::Status(status),
        ]);
    }

    pub fn stopping(&self, status: &str) {
        self.send(&[NotifyState::Stopping, NotifyState::Status(status)]);
    }

    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }
}

/// Pings the watchdog at half its period, while Envoy's admin answers (always, without an admin).
pub fn spawn_watchdog(admin: Option<AdminClient>) {
    let Some(period) = sd_notify::watchdog_enabled() else { return };
    let interval = (period / 2).max(Duration::from_millis(10));
    tracing::info!("systemd watchdog every {period:?}: pinging every {interval:?} while Envoy answers");
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        loop {
            ticks.tick().await;
            let alive = match &admin {
                Some(admin) => admin.server_info().await.is_ok(),
                None => true,
            };
            if alive {
                let _ = sd_notify::notify(&[NotifyState::Watchdog]);
            } else {
                tracing::warn!("Envoy's admin does not answer: no watchdog ping");
            }
        }
    });
}
