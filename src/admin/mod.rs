//! Envoy's admin API, as the launcher uses it: whether an epoch is LIVE, how many downstream
//! connections are open, and the drain requests (`live`: the wait for an epoch to be LIVE). Requests go through `http::HttpClient`, each
//! bounded by a timeout.

use std::time::Duration;

use hyper::Method;
use hyper::body::Bytes;

use crate::http::{Endpoint, HttpClient, HttpError, KeptConnection};

mod live;
mod sds;
pub use live::{NotLive, await_live};
pub use sds::SdsUpdates;

/// How long one admin request may take. Envoy answers in milliseconds; a second means it is hung.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct AdminClient {
    http: HttpClient,
}

/// Where an epoch's admin is: an address, or, for an admin on port 0, the file Envoy writes the
/// address it bound to (`--admin-address-path`), once it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminAddress {
    At(Endpoint),
    InFile(std::path::PathBuf),
}

impl AdminAddress {
    /// The address now: None while the file is not written yet.
    pub fn resolve(&self) -> Option<Endpoint> {
        match self {
            AdminAddress::At(endpoint) => Some(endpoint.clone()),
            AdminAddress::InFile(file) => std::fs::read_to_string(file).ok()?.trim().parse().ok(),
        }
    }
}

impl std::fmt::Display for AdminAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminAddress::At(endpoint) => write!(f, "{endpoint}"),
            AdminAddress::InFile(file) => write!(f, "the address Envoy writes to {}", file.display()),
        }
    }
}

impl AdminClient {
    pub fn new(address: Endpoint) -> Self {
        AdminClient { http: HttpClient::new(address, REQUEST_TIMEOUT) }
    }

    /// Over `kept` alone: a hot restart's older epoch, whose admin address its successor took.
    pub fn kept_only(address: Endpoint, kept: KeptConnection) -> Self {
        AdminClient { http: HttpClient::new(address, REQUEST_TIMEOUT).kept_only(kept) }
    }

    /// Without the fallback on a kept connection.
    pub fn new_connections_only(self) -> Self {
        AdminClient { http: self.http.without_kept() }
    }

    /// `health` on the admin address, else over the kept connection, saying which.
    pub async fn health_anyhow(&self) -> Result<EnvoyHealth, HttpError> {
        match self.clone().new_connections_only().health().await {
            Err(HttpError::Connect(..)) => {
                let health = self.health().await?;
                Ok(EnvoyHealth { over_kept_connection: true, ..health })
            }
            answer => answer,
        }
    }

    /// Falls back on `kept` (a connection opened while the admin listened) once the admin takes no
    /// new connection: a hot-restart child closes its parent's admin listener early in its start.
    pub fn with_kept(self, kept: KeptConnection) -> Self {
        AdminClient { http: self.http.with_kept(kept) }
    }

    /// Requests sent through this client and its clones since it was made.
    pub fn requests_sent(&self) -> u32 {
        self.http.requests_sent()
    }

    pub fn address(&self) -> &Endpoint {
        self.http.endpoint()
    }

    /// A request that must answer 200.
    pub async fn expect_ok(&self, method: Method, path: &str) -> Result<Bytes, HttpError> {
        self.http.expect_ok(method, path).await
    }

    /// Downstream connections open in Envoy: the sum of the live per-listener gauges
    /// `listener.<name>.downstream_cx_active`, without the admin listener and the per-worker copies.
    /// (`server.total_connections` would be simpler, but Envoy refreshes it only at each stats flush,
    /// every 5 s by default, so a drain polling it would react seconds late.)
    pub async fn downstream_connections(&self, counted: &Listeners, ignored: &Ignored) -> Result<u64, HttpError> {
        const PATH: &str = "/stats?format=json&filter=%5Elistener%5C..*%5C.downstream_cx_active%24";
        let body = self.expect_ok(Method::GET, PATH).await?;
        sum_listener_connections(&body, counted, ignored).ok_or_else(|| self.http.unreadable(PATH, &body))
    }

    /// Every listener's name with its stat name (`listener.<stat name>.`): its `stat_prefix`, else
    /// its address as Envoy writes it in stats (`127.0.0.1_9100`). `/listeners` has names and
    /// addresses but not the prefix, so the listeners' configuration is read (only those fields).
    pub async fn listener_stat_names(&self) -> Result<Vec<(String, String)>, HttpError> {
        const PATHS: [&str; 2] = [
            "/config_dump?resource=static_listeners&mask=listener.name,listener.stat_prefix,listener.address",
            "/config_dump?resource=dynamic_listeners&mask=name,active_state.listener.name,\
             active_state.listener.stat_prefix,active_state.listener.address",
        ];
        let mut found = Vec::new();
        for path in PATHS {
            let body = self.expect_ok(Method::GET, path).await?;
            let dump: serde_json::Value =
                serde_json::from_slice(&body).map_err(|_| self.http.unreadable(path, &body))?;
            collect_listeners(&dump, &mut found);
        }
        Ok(found)
    }
}

impl AdminClient {
    /// Every listener's name and port (`/listeners`, which has the port a listener on port 0 was
    /// given); None for a listener on no port (a unix socket, an internal listener).
    pub async fn listener_ports(&self) -> Result<Vec<(String, Option<u16>)>, HttpError> {
        const PATH: &str = "/listeners?format=json";
        let body = self.expect_ok(Method::GET, PATH).await?;
        let status: serde_json::Value = serde_json::from_slice(&body).map_err(|_| self.http.unreadable(PATH, &body))?;
        let listeners = status.get("listener_statuses").and_then(|l| l.as_array());
        let listeners = listeners.ok_or_else(|| self.http.unreadable(PATH, &body))?;
        let port = |l: &serde_json::Value| {
            let port = l.pointer("/local_address/socket_address/port_value")?.as_u64()?;
            u16::try_from(port).ok()
        };
        let name = |l: &serde_json::Value| l.get("name").and_then(|n| n.as_str()).unwrap_or_default().to_string();
        Ok(listeners.iter().map(|l| (name(l), port(l))).collect())
    }
}

/// What `/server_info` says about the process that answers on the admin address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    /// LIVE, DRAINING, PRE_INITIALIZING or INITIALIZING.
    pub state: String,
    pub restart_epoch: u32,
    /// Which hot-restart family the answering Envoy belongs to.
    pub family: Family,
    /// Its `--hot-restart-version`: a hot restart needs the same on both sides.
    pub hot_restart_version: Option<String>,
}

/// A hot-restart family as Envoy reports it in `/server_info`: with `--use-dynamic-base-id` (epoch
/// 0) its `--base-id-path`, otherwise its `--base-id`. Another Envoy can answer on the same admin
/// address (a stale one still dying, a second launcher's on a shared bootstrap); this tells them
/// apart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Family {
    pub base_id_path: Option<String>,
    pub base_id: Option<u32>,
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.base_id_path, self.base_id) {
            (Some(path), _) => write!(f, "base id path {path}"),
            (None, Some(id)) => write!(f, "base id {id}"),
            (None, None) => f.write_str("unknown base id"),
        }
    }
}

impl Family {
    /// Whether `answered` (a family as Envoy reported it) is this one. A later epoch (started with
    /// `--base-id`) is ours only once our base id is known: none of ours runs before. An answer
    /// that names no family (an Envoy that does not report it) is taken for ours.
    pub fn owns(&self, answered: &Family) -> bool {
        match (&answered.base_id_path, answered.base_id) {
            (Some(path), _) => self.base_id_path.as_ref() == Some(path),
            (None, Some(id)) => self.base_id == Some(id),
            (None, None) => true,
        }
    }
}

impl AdminClient {
    pub async fn server_info(&self) -> Result<ServerInfo, HttpError> {
        let body = self.expect_ok(Method::GET, "/server_info").await?;
        parse_server_info(&body).ok_or_else(|| self.http.unreadable("/server_info", &body))
    }

    /// Open connections for a drain, and whether they are all counted. While a hot restart's older
    /// epoch lives, its connections reach this epoch's listener gauges only at its stats flushes
    /// (a merged share, stale in between). With `older` (that epoch's admin over its kept
    /// connection) they are read from it and added: the sum is never below the truth (the merged
    /// share only overstates, since the older epoch no longer accepts) and reaches the threshold at
    /// most one stats flush after it. Without it, or when it does not answer,
    /// `server.total_connections` (refreshed at each flush) is taken instead, and the count is not
    /// complete: the drain then waits for the older epoch's exit.
    pub async fn connections_across_epochs(
        &self,
        counted: &Listeners,
        ignored: &Ignored,
        older_alive: bool,
        older: Option<&AdminClient>,
    ) -> Result<(u64, bool), HttpError> {
        let own = self.downstream_connections(counted, ignored).await?;
        if !older_alive {
            return Ok((own, true));
        }
        if let Some(older) = older {
            match older.downstream_connections(counted, ignored).await {
                Ok(theirs) => return Ok((own + theirs, true)),
                Err(e) => tracing::debug!("the older epoch's connections: {e}"),
            }
        }
        const PATH: &str = "/stats?format=json&filter=%5Eserver%5C.total_connections%24";
        let body = self.expect_ok(Method::GET, PATH).await?;
        let total = sum_stats(&body, |name| name == "server.total_connections")
            .ok_or_else(|| self.http.unreadable(PATH, &body))?;
        Ok((own.max(total), false))
    }
}

/// What a health probe reads from Envoy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvoyHealth {
    pub state: String,
    pub restart_epoch: u32,
    /// `listener_manager.listener_stopped`: listeners stopped through `/drain_listeners`, which
    /// refuse connections while `/server_info` still says LIVE. (A hot restart's old epoch does not
    /// add to the new epoch's count.)
    pub listeners_stopped: u64,
    pub family: Family,
    /// The admin address took no new connection: the answer came over the connection sesame kept.
    pub over_kept_connection: bool,
}

impl AdminClient {
    pub async fn health(&self) -> Result<EnvoyHealth, HttpError> {
        let info = self.server_info().await?;
        const PATH: &str = "/stats?format=json&filter=%5Elistener_manager%5C.listener_stopped%24";
        let body = self.expect_ok(Method::GET, PATH).await?;
        let listeners_stopped = sum_stats(&body, |name| name == "listener_manager.listener_stopped")
            .ok_or_else(|| self.http.unreadable(PATH, &body))?;
        Ok(EnvoyHealth {
            state: info.state,
            restart_epoch: info.restart_epoch,
            listeners_stopped,
            family: info.family,
            over_kept_connection: false,
        })
    }

    /// Whether this Envoy has started its workers, which it does in the same moment it tells its
    /// parent epoch to drain its listeners: from then on it is the one that serves.
    pub async fn workers_started(&self) -> Result<bool, HttpError> {
        const PATH: &str = "/stats?format=json&filter=%5Elistener_manager%5C.workers_started%24";
        let body = self.expect_ok(Method::GET, PATH).await?;
        let started = sum_stats(&body, |name| name == "listener_manager.workers_started")
            .ok_or_else(|| self.http.unreadable(PATH, &body))?;
        Ok(started > 0)
    }
}

fn parse_server_info(body: &[u8]) -> Option<ServerInfo> {
    let info: serde_json::Value = serde_json::from_slice(body).ok()?;
    let epoch = info.pointer("/command_line_options/restart_epoch")?;
    let restart_epoch = epoch.as_u64().or_else(|| epoch.as_str()?.parse().ok())?;
    let options = info.get("command_line_options")?;
    let family = if options.get("use_dynamic_base_id").and_then(serde_json::Value::as_bool) == Some(true) {
        Family { base_id_path: options.get("base_id_path").and_then(|p| p.as_str()).map(str::to_string), base_id: None }
    } else {
        let id = options.get("base_id");
        let id = id.and_then(|v| v.as_u64().or_else(|| v.as_str()?.parse().ok())).and_then(|v| u32::try_from(v).ok());
        Family { base_id_path: None, base_id: id }
    };
    Some(ServerInfo {
        state: info.get("state")?.as_str()?.to_string(),
        restart_epoch: u32::try_from(restart_epoch).ok()?,
        family,
        hot_restart_version: info.get("hot_restart_version").and_then(|v| v.as_str()).map(str::to_string),
    })
}

/// The listeners whose connections a drain waits for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Listeners {
    /// Every listener but the admin.
    #[default]
    All,
    /// Only these, by stat name (`listener.<name>.`): the INBOUND ones with --drain-inbound-only.
    Named(Vec<String>),
}

/// Listeners a drain does not wait for (`--drain-ignore-listener`): the stat names of the listeners
/// whose names matched, and the patterns, which may name a stat name directly.
#[derive(Debug, Clone, Default)]
pub struct Ignored {
    pub stat_names: Vec<String>,
    pub patterns: Vec<regex::Regex>,
}

impl Ignored {
    fn ignores(&self, stat_name: &str) -> bool {
        self.stat_names.iter().any(|s| s == stat_name) || self.patterns.iter().any(|r| r.is_match(stat_name))
    }
}

/// Finds every listener (an object with a `name` and an `address`) in a config dump, with its
/// stat name.
fn collect_listeners(value: &serde_json::Value, found: &mut Vec<(String, String)>) {
    match value {
        serde_json::Value::Object(object) => {
            let name = object.get("name").and_then(|n| n.as_str());
            let stat = object.get("stat_prefix").and_then(|p| p.as_str()).map(str::to_string).or_else(|| {
                let socket = object.get("address")?.get("socket_address")?;
                let host = socket.get("address")?.as_str()?;
                let port = socket.get("port_value")?.as_u64()?;
                let host = if host.contains(':') { format!("[{host}]") } else { host.to_string() };
                Some(format!("{host}:{port}").replace(':', "_"))
            });
            if let (Some(name), Some(stat)) = (name, stat) {
                found.push((name.to_string(), stat));
            }
            object.values().for_each(|v| collect_listeners(v, found));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_listeners(v, found)),
        _ => {}
    }
}

/// Sums the listener gauges of `/stats?format=json`.
fn sum_listener_connections(body: &[u8], counted: &Listeners, ignored: &Ignored) -> Option<u64> {
    let wanted = |name: &str| {
        let Some(listener) = name.strip_prefix("listener.").and_then(|n| n.strip_suffix(".downstream_cx_active"))
        else {
            return false;
        };
        let per_worker = listener.rsplit_once('.').is_some_and(|(_, last)| last.starts_with("worker_"));
        let admin = listener == "admin" || listener.starts_with("admin.");
        if ignored.ignores(listener) {
            return false;
        }
        match counted {
            Listeners::All => !admin && !per_worker,
            Listeners::Named(names) => names.iter().any(|n| n == listener),
        }
    };
    sum_stats(body, wanted)
}

/// Sums the stats of `/stats?format=json` (`{"stats":[{"name":..,"value":..}]}`) whose name is `wanted`.
fn sum_stats(body: &[u8], wanted: impl Fn(&str) -> bool) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Stats {
        stats: Vec<Stat>,
    }
    #[derive(serde::Deserialize)]
    struct Stat {
        name: Option<String>,
        value: Option<serde_json::Value>,
    }
    let stats: Stats = serde_json::from_slice(body).ok()?;
    Some(
        stats
            .stats
            .iter()
            .filter(|s| s.name.as_deref().is_some_and(&wanted))
            .filter_map(|s| s.value.as_ref()?.as_u64())
            .sum(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_listener_gauges_without_admin_and_worker_copies() {
        let body = br#"{"stats":[
            {"name":"listener.127.0.0.1_18082.downstream_cx_active","value":2},
            {"name":"listener.127.0.0.1_18082.worker_0.downstream_cx_active","value":1},
            {"name":"listener.127.0.0.1_18082.worker_1.downstream_cx_active","value":1},
            {"name":"listener.ingress_https.downstream_cx_active","value":3},
            {"name":"listener.admin.downstream_cx_active","value":1},
            {"name":"listener.admin.main_thread.downstream_cx_active","value":1}
        ]}"#;
        let none = Ignored::default();
        assert_eq!(sum_listener_connections(body, &Listeners::All, &none), Some(5));
        let inbound = Listeners::Named(vec!["ingress_https".into()]);
        assert_eq!(sum_listener_connections(body, &inbound, &none), Some(3));
        assert_eq!(sum_listener_connections(br#"{"stats":[]}"#, &Listeners::All, &none), Some(0));
        assert_eq!(sum_listener_connections(b"not json", &Listeners::All, &none), None);
        let by_name = Ignored { stat_names: vec!["127.0.0.1_18082".into()], patterns: Vec::new() };
        assert_eq!(sum_listener_connections(body, &Listeners::All, &by_name), Some(3));
        let whole = |r: &str| regex::Regex::new(&format!("^(?:{r})$")).expect("regex");
        let by_stat = Ignored { stat_names: Vec::new(), patterns: vec![whole("ingress_.*")] };
        assert_eq!(sum_listener_connections(body, &Listeners::All, &by_stat), Some(2));
    }

    #[test]
    fn listeners_are_found_in_a_config_dump_with_their_stat_names() {
        let dump = serde_json::json!({"configs": [
            {"listener": {"name": "metrics", "stat_prefix": "metrics_sp",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 9100}}}},
            {"name": "web", "active_state": {"listener": {"name": "web",
                "address": {"socket_address": {"address": "::", "port_value": 443}}}}}
        ]});
        let mut found = Vec::new();
        collect_listeners(&dump, &mut found);
        let expected = [("metrics", "metrics_sp"), ("web", "[__]_443")];
        assert_eq!(found, expected.map(|(n, s)| (n.to_string(), s.to_string())));
    }

    #[test]
    fn reads_state_and_epoch_from_server_info() {
        let body = br#"{"state":"LIVE","hot_restart_version":"11.104","command_line_options":{"restart_epoch":2,"base_id":"7"}}"#;
        let family = Family { base_id_path: None, base_id: Some(7) };
        let hot_restart_version = Some("11.104".to_string());
        let expected = ServerInfo { state: "LIVE".into(), restart_epoch: 2, family, hot_restart_version };
        assert_eq!(parse_server_info(body), Some(expected));
        assert_eq!(parse_server_info(br#"{"state":"LIVE"}"#), None);
        let body = br#"{"state":"LIVE","command_line_options":{"restart_epoch":0,"base_id":"0",
            "use_dynamic_base_id":true,"base_id_path":"/run/s/envoy-base-id"}}"#;
        let family = parse_server_info(body).expect("parsed").family;
        assert_eq!(family, Family { base_id_path: Some("/run/s/envoy-base-id".into()), base_id: None });
    }

    #[test]
    fn a_family_is_told_from_another() {
        let ours = Family { base_id_path: Some("/run/a/envoy-base-id".into()), base_id: Some(41) };
        let epoch0 = Family { base_id_path: Some("/run/a/envoy-base-id".into()), base_id: None };
        let other0 = Family { base_id_path: Some("/run/b/envoy-base-id".into()), base_id: None };
        assert!(ours.owns(&epoch0));
        assert!(!ours.owns(&other0), "another launcher's Envoy on the same admin address");
        assert!(ours.owns(&Family { base_id_path: None, base_id: Some(41) }), "a later epoch passes --base-id");
        assert!(!ours.owns(&Family { base_id_path: None, base_id: Some(42) }));
        let unknown_id = Family { base_id_path: Some("/run/a/envoy-base-id".into()), base_id: None };
        let later_epoch = Family { base_id_path: None, base_id: Some(42) };
        assert!(!unknown_id.owns(&later_epoch), "another family's epoch 1 while ours is at epoch 0");
        assert!(ours.owns(&Family::default()), "an Envoy that names no family");
        let fixed = Family { base_id_path: None, base_id: Some(7) };
        assert!(!fixed.owns(&epoch0), "a dynamic family is not a fixed one");
    }
}
