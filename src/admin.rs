//! A client for Envoy's admin API: HTTP/1.1 over a unix socket or TCP. Every request opens its own
//! connection (a stale keep-alive connection to an admin that moved to a new epoch would fail) and
//! is bounded by a timeout, so a hung admin can never hang the launcher.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

/// Where Envoy's admin API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminAddress {
    Unix(PathBuf),
    Tcp(String, u16),
}

impl std::fmt::Display for AdminAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminAddress::Unix(path) => write!(f, "unix:{}", path.display()),
            AdminAddress::Tcp(host, port) if host.contains(':') => write!(f, "[{host}]:{port}"),
            AdminAddress::Tcp(host, port) => write!(f, "{host}:{port}"),
        }
    }
}

impl FromStr for AdminAddress {
    type Err = String;

    /// `unix:PATH` or a path (anything with a '/') for a unix socket, `HOST:PORT` for TCP.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Some(path) = text.strip_prefix("unix:") {
            return Ok(AdminAddress::Unix(path.into()));
        }
        if text.contains('/') {
            return Ok(AdminAddress::Unix(text.into()));
        }
        let (host, port) =
            text.rsplit_once(':').ok_or_else(|| format!("admin address '{text}' is neither a path nor HOST:PORT"))?;
        let port = port.parse().map_err(|_| format!("admin address '{text}' has no valid port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        Ok(AdminAddress::Tcp(if host.is_empty() { "127.0.0.1".into() } else { host.into() }, port))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin {0} unreachable: {1}")]
    Connect(AdminAddress, std::io::Error),
    #[error("admin {0} did not answer within {1:?}")]
    Timeout(AdminAddress, Duration),
    #[error("admin {0}: {1}")]
    Http(AdminAddress, hyper::Error),
    #[error("admin {0} answered {2} to {1}")]
    Status(AdminAddress, String, StatusCode),
    #[error("admin {0} sent an unreadable answer to {1}: {2}")]
    Body(AdminAddress, String, String),
}

#[derive(Debug, Clone)]
pub struct AdminClient {
    address: AdminAddress,
    timeout: Duration,
}

/// How long one admin request may take. Envoy answers in milliseconds; a second means it is hung.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

impl AdminClient {
    pub fn new(address: AdminAddress) -> Self {
        AdminClient { address, timeout: DEFAULT_REQUEST_TIMEOUT }
    }

    pub fn address(&self) -> &AdminAddress {
        &self.address
    }

    /// Sends one request and returns the status and body.
    pub async fn request(&self, method: Method, path: &str) -> Result<(StatusCode, Bytes), AdminError> {
        tokio::time::timeout(self.timeout, self.request_unbounded(method, path))
            .await
            .map_err(|_| AdminError::Timeout(self.address.clone(), self.timeout))?
    }

    async fn request_unbounded(&self, method: Method, path: &str) -> Result<(StatusCode, Bytes), AdminError> {
        let connect_error = |e| AdminError::Connect(self.address.clone(), e);
        match &self.address {
            AdminAddress::Unix(socket) => {
                let stream = connect_unix(socket).await.map_err(connect_error)?;
                self.exchange(stream, method, path).await
            }
            AdminAddress::Tcp(host, port) => {
                let stream = TcpStream::connect((host.as_str(), *port)).await.map_err(connect_error)?;
                self.exchange(stream, method, path).await
            }
        }
    }

    async fn exchange<S>(&self, stream: S, method: Method, path: &str) -> Result<(StatusCode, Bytes), AdminError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let http_error = |e| AdminError::Http(self.address.clone(), e);
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(http_error)?;
        // The connection task ends with the response (Connection: close) or when this future is dropped.
        let driver = tokio::spawn(connection);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "envoy-admin")
            .header(hyper::header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| AdminError::Body(self.address.clone(), path.to_string(), e.to_string()))?;
        let result = async {
            let response = sender.send_request(request).await.map_err(http_error)?;
            let status = response.status();
            let body = response.into_body().collect().await.map_err(http_error)?.to_bytes();
            Ok((status, body))
        }
        .await;
        driver.abort();
        result
    }

    /// A request that must answer 200.
    pub async fn expect_ok(&self, method: Method, path: &str) -> Result<Bytes, AdminError> {
        let (status, body) = self.request(method, path).await?;
        if status != StatusCode::OK {
            return Err(AdminError::Status(self.address.clone(), path.to_string(), status));
        }
        Ok(body)
    }

    /// Downstream connections open in Envoy: the sum of the live per-listener gauges
    /// `listener.<name>.downstream_cx_active`, without the admin listener and the per-worker copies.
    /// (`server.total_connections` would be simpler, but Envoy refreshes it only at each stats flush,
    /// every 5 s by default, so a drain polling it would react seconds late.)
    pub async fn downstream_connections(&self, counted: &Listeners) -> Result<u64, AdminError> {
        const PATH: &str = "/stats?format=json&filter=%5Elistener%5C..*%5C.downstream_cx_active%24";
        let body = self.expect_ok(Method::GET, PATH).await?;
        sum_listener_connections(&body, counted)
            .ok_or_else(|| AdminError::Body(self.address.clone(), PATH.into(), String::from_utf8_lossy(&body).into()))
    }
}

/// Connects to a unix socket; a path starting with '@' names one in the abstract namespace, as
/// in Envoy's `pipe.path`.
async fn connect_unix(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    if let Some(name) = path.as_os_str().as_bytes().strip_prefix(b"@") {
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        // A local connect either succeeds or fails at once; it does not wait on a network.
        let stream = std::os::unix::net::UnixStream::connect_addr(&address)?;
        stream.set_nonblocking(true)?;
        return UnixStream::from_std(stream);
    }
    UnixStream::connect(path).await
}

/// What `/server_info` says about the process that answers on the admin address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    /// LIVE, DRAINING, PRE_INITIALIZING or INITIALIZING.
    pub state: String,
    pub restart_epoch: u32,
}

impl AdminClient {
    pub async fn server_info(&self) -> Result<ServerInfo, AdminError> {
        let body = self.expect_ok(Method::GET, "/server_info").await?;
        parse_server_info(&body).ok_or_else(|| {
            AdminError::Body(self.address.clone(), "/server_info".into(), String::from_utf8_lossy(&body).into())
        })
    }

    /// Open connections for a drain: the listener gauges, and while an older epoch still runs, also
    /// `server.total_connections`, the only stat that counts the old epoch's connections (refreshed
    /// at each stats flush, so it may lag by one flush interval).
    pub async fn connections_across_epochs(
        &self,
        counted: &Listeners,
        older_epoch_alive: bool,
    ) -> Result<u64, AdminError> {
        let own = self.downstream_connections(counted).await?;
        if !older_epoch_alive {
            return Ok(own);
        }
        const PATH: &str = "/stats?format=json&filter=%5Eserver%5C.total_connections%24";
        let body = self.expect_ok(Method::GET, PATH).await?;
        let total = sum_stats(&body, |name| name == "server.total_connections").ok_or_else(|| {
            AdminError::Body(self.address.clone(), PATH.into(), String::from_utf8_lossy(&body).into())
        })?;
        Ok(own.max(total))
    }
}

fn parse_server_info(body: &[u8]) -> Option<ServerInfo> {
    let info: serde_json::Value = serde_json::from_slice(body).ok()?;
    let epoch = info.pointer("/command_line_options/restart_epoch")?;
    let restart_epoch = epoch.as_u64().or_else(|| epoch.as_str()?.parse().ok())?;
    Some(ServerInfo {
        state: info.get("state")?.as_str()?.to_string(),
        restart_epoch: u32::try_from(restart_epoch).ok()?,
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

/// Sums the listener gauges of `/stats?format=json`.
fn sum_listener_connections(body: &[u8], counted: &Listeners) -> Option<u64> {
    let wanted = |name: &str| {
        let Some(listener) = name.strip_prefix("listener.").and_then(|n| n.strip_suffix(".downstream_cx_active"))
        else {
            return false;
        };
        let per_worker = listener.rsplit_once('.').is_some_and(|(_, last)| last.starts_with("worker_"));
        let admin = listener == "admin" || listener.starts_with("admin.");
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
    fn parses_admin_addresses() {
        assert_eq!("/run/a.sock".parse(), Ok(AdminAddress::Unix("/run/a.sock".into())));
        assert_eq!("unix:a.sock".parse(), Ok(AdminAddress::Unix("a.sock".into())));
        assert_eq!("127.0.0.1:9901".parse(), Ok(AdminAddress::Tcp("127.0.0.1".into(), 9901)));
        assert_eq!("[::1]:9901".parse(), Ok(AdminAddress::Tcp("::1".into(), 9901)));
        assert_eq!(":9901".parse(), Ok(AdminAddress::Tcp("127.0.0.1".into(), 9901)));
        assert!("localhost".parse::<AdminAddress>().is_err());
        assert!("localhost:http".parse::<AdminAddress>().is_err());
    }

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
        assert_eq!(sum_listener_connections(body, &Listeners::All), Some(5));
        let inbound = Listeners::Named(vec!["ingress_https".into()]);
        assert_eq!(sum_listener_connections(body, &inbound), Some(3));
        assert_eq!(sum_listener_connections(br#"{"stats":[]}"#, &Listeners::All), Some(0));
        assert_eq!(sum_listener_connections(b"not json", &Listeners::All), None);
    }

    #[tokio::test]
    async fn connects_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("sesame-test-{}", std::process::id());
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("name");
        let listener = std::os::unix::net::UnixListener::bind_addr(&address).expect("bind abstract");
        let connected = connect_unix(Path::new(&format!("@{name}"))).await;
        assert!(connected.is_ok(), "{connected:?}");
        assert!(listener.accept().is_ok());
    }

    #[test]
    fn reads_state_and_epoch_from_server_info() {
        let body = br#"{"state":"LIVE","command_line_options":{"restart_epoch":2,"base_id":"0"}}"#;
        assert_eq!(parse_server_info(body), Some(ServerInfo { state: "LIVE".into(), restart_epoch: 2 }));
        assert_eq!(parse_server_info(br#"{"state":"LIVE"}"#), None);
    }

    #[tokio::test]
    async fn a_hung_admin_times_out_and_a_missing_one_fails_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("hung.sock");
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
        let _accepting = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let mut client = AdminClient::new(AdminAddress::Unix(socket));
        client.timeout = Duration::from_millis(200);
        let err = client.downstream_connections(&Listeners::All).await.expect_err("hung");
        assert!(matches!(err, AdminError::Timeout(..)), "{err}");

        let missing = AdminClient::new(AdminAddress::Unix(dir.path().join("missing.sock")));
        let err = missing.downstream_connections(&Listeners::All).await.expect_err("missing");
        assert!(matches!(err, AdminError::Connect(..)), "{err}");
    }
}
