//! The launcher's Prometheus metrics. Only the supervisor records them (they are atomics), except the
//! orphans reaped, which the reaper counts where SIGCHLD arrives; the control API renders them as text.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RotationLabel {
    pub mode: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabel {
    pub path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

pub struct Metrics {
    registry: Registry,
    pub epochs_started: Counter,
    pub live_epochs: Gauge,
    pub current_epoch: Gauge,
    pub degraded: Gauge,
    pub reloads: Family<ResultLabel, Counter>,
    pub recoveries: Family<ResultLabel, Counter>,
    pub drains: Family<ReasonLabel, Counter>,
    pub drain_seconds: Histogram,
    pub connections_at_sigterm: Gauge,
    pub reaped: Family<KindLabel, Counter>,
    pub draining_epochs_lost: Counter,
    pub expected_abort: Gauge,
    pub rotations: Family<RotationLabel, Counter>,
    pub certificate_not_after: Family<PathLabel, Gauge>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("sesame");
        let metrics = Metrics {
            epochs_started: Counter::default(),
            live_epochs: Gauge::default(),
            current_epoch: Gauge::default(),
            degraded: Gauge::default(),
            reloads: Family::default(),
            recoveries: Family::default(),
            drains: Family::default(),
            drain_seconds: Histogram::new(exponential_buckets(0.05, 2.0, 12)),
            connections_at_sigterm: Gauge::default(),
            reaped: Family::default(),
            draining_epochs_lost: Counter::default(),
            expected_abort: Gauge::default(),
            rotations: Family::default(),
            certificate_not_after: Family::default(),
            registry: Registry::default(),
        };
        registry.register("epochs_started", "Envoy epochs started", metrics.epochs_started.clone());
        registry.register("live_epochs", "Envoy processes alive now", metrics.live_epochs.clone());
        registry.register("current_epoch", "Restart epoch of the serving Envoy", metrics.current_epoch.clone());
        registry.register(
            "degraded",
            "1 while Envoy's hot restart is blocked (until a cold handover)",
            metrics.degraded.clone(),
        );
        registry.register(
            "reloads",
            "Reloads by result (success, refused before any start, failed after start)",
            metrics.reloads.clone(),
        );
        registry.register(
            "recoveries",
            "Cold handovers to a new Envoy family by result (success, refused before any start, failed after start)",
            metrics.recoveries.clone(),
        );
        registry.register("drains", "Drains by the reason they ended", metrics.drains.clone());
        registry.register("drain_seconds", "Duration of drains", metrics.drain_seconds.clone());
        registry.register(
            "drain_connections_at_sigterm",
            "Downstream connections open when the last drain sent SIGTERM",
            metrics.connections_at_sigterm.clone(),
        );
        registry.register("reaped_children", "Processes reaped, by kind", metrics.reaped.clone());
        registry.register(
            "draining_epochs_lost",
            "Draining epochs that ended before their successor told them to (killed, say)",
            metrics.draining_epochs_lost.clone(),
        );
        registry.register(
            "expected_abort_timestamp_seconds",
            "When Envoy's current epoch is expected to abort because its draining parent is gone (0: not expected)",
            metrics.expected_abort.clone(),
        );
        registry.register(
            "rotations",
            "Certificate rotations by mode (in_place: an SDS swap) and result (success, refused by sesame's checks, \
             rejected by Envoy, unconfirmed)",
            metrics.rotations.clone(),
        );
        registry.register(
            "certificate_not_after_timestamp_seconds",
            "When each certificate given to Envoy by SDS expires (its notAfter), by the path it was read from",
            metrics.certificate_not_after.clone(),
        );
        Metrics { registry, ..metrics }
    }

    pub fn reload(&self, result: &str) {
        self.reloads.get_or_create(&ResultLabel { result: result.into() }).inc();
    }

    pub fn recovery(&self, result: &str) {
        self.recoveries.get_or_create(&ResultLabel { result: result.into() }).inc();
    }

    pub fn rotation(&self, mode: &str, result: &str) {
        self.rotations.get_or_create(&RotationLabel { mode: mode.into(), result: result.into() }).inc();
    }

    pub fn certificate_expires(&self, path: &std::path::Path, not_after_unix: i64) {
        let label = PathLabel { path: path.display().to_string() };
        self.certificate_not_after.get_or_create(&label).set(not_after_unix);
    }

    /// A certificate no longer given to Envoy: its expiry is not reported any more.
    pub fn forget_certificate(&self, path: &std::path::Path) {
        self.certificate_not_after.remove(&PathLabel { path: path.display().to_string() });
    }

    pub fn reaped(&self, kind: &str) {
        self.reaped.get_or_create(&KindLabel { kind: kind.into() }).inc();
    }

    /// The orphans' counter, which the reaper adds to where it reaps them (an atomic, shared).
    pub fn orphans(&self) -> Counter {
        self.reaped.get_or_create(&KindLabel { kind: "orphan".into() }).clone()
    }

    /// The Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_labels() {
        let metrics = Metrics::new();
        metrics.reload("success");
        metrics.reaped("orphan");
        metrics.drain_seconds.observe(0.3);
        let text = metrics.render();
        assert!(text.contains("sesame_reloads_total{result=\"success\"} 1"), "{text}");
        assert!(text.contains("sesame_reaped_children_total{kind=\"orphan\"} 1"), "{text}");
        assert!(text.contains("sesame_drain_seconds_count 1"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
