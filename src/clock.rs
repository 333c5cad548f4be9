//! Wall-clock time as the launcher reports it: whole seconds since the Unix epoch.

use std::time::SystemTime;

/// Seconds since 1970-01-01 UTC; 0 for a time before it (a clock set far back).
pub fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
