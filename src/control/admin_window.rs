//! `GET /envoy/PATH`: a read-only window on the serving epoch's admin API, so that Envoy's metrics
//! can be scraped without exposing the admin itself (whose `/quitquitquit`, `/drain_listeners` and
//! `/config_dump` anyone who reaches it may call). Only the paths of `READABLE` pass, with their
//! query string; the answer is passed on as Envoy sends it, never held whole, within
//! `WHOLE_ANSWER_TIMEOUT`. A scrape goes through Envoy's admin listener, which the drain does not
//! count, so it never holds a shutdown open.

use std::time::Duration;

use http_body_util::BodyExt;
use hyper::{StatusCode, Uri};
use tokio::time::Instant;

use super::{Body, ControlApi, ControlRequest, text};
use crate::http::{HttpClient, HttpError};

/// The admin paths readable through `/envoy/...`: Envoy's metrics (Prometheus text, and the native
/// `/stats` for tools that read its text or JSON: the same numbers), what runs (`/server_info`),
/// the certificates in use and their expiry (`/certs`: no private keys), and readiness (`/ready`).
/// Everything else is left out: it changes Envoy (`/quitquitquit`, `/drain_listeners`,
/// `/healthcheck/fail`, `/logging`, `/runtime_modify`), or shows configuration and upstreams that a
/// scraper has no need for (`/config_dump`, `/clusters`, `/listeners`).
pub(super) const READABLE: [&str; 5] = ["/stats/prometheus", "/stats", "/server_info", "/certs", "/ready"];

/// How long Envoy has to send the head of its answer.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the whole answer may take, its last byte delivered to the client: a client that stops
/// reading, or an Envoy that stalls half-way, loses the connection then.
pub(super) const WHOLE_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// The admin path and query that `/envoy/PATH?QUERY` reads, or None when it is not readable.
pub(super) fn admin_path(uri: &Uri) -> Option<String> {
    let path = uri.path().strip_prefix("/envoy")?;
    READABLE.contains(&path).then(|| match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_string(),
    })
}

impl ControlApi {
    /// Envoy's answer to `admin_path`, passed on as it arrives. `ends_by` is the connection's end:
    /// set to `WHOLE_ANSWER_TIMEOUT` from now, since only dropping the connection can end an answer
    /// whose client stopped reading.
    pub(super) async fn admin_window(
        &self,
        admin_path: &str,
        ends_by: &tokio::sync::watch::Sender<Option<Instant>>,
    ) -> hyper::Response<Body> {
        let admin = match self.ask(ControlRequest::EnvoyAdmin).await {
            Some(Ok(endpoint)) => endpoint,
            Some(Err(why)) => return text(StatusCode::SERVICE_UNAVAILABLE, &format!("{why}\n")),
            None => return text(StatusCode::SERVICE_UNAVAILABLE, "stopping: Envoy's admin is no longer read\n"),
        };
        ends_by.send_replace(Some(Instant::now() + WHOLE_ANSWER_TIMEOUT));
        let response = match HttpClient::new(admin, HEAD_TIMEOUT).get_streamed(admin_path).await {
            Ok(response) => response,
            Err(e) => {
                tracing::debug!("GET /envoy{admin_path}: {e}");
                let status = match e {
                    HttpError::Connect(..) => StatusCode::SERVICE_UNAVAILABLE,
                    HttpError::Timeout(..) => StatusCode::GATEWAY_TIMEOUT,
                    _ => StatusCode::BAD_GATEWAY,
                };
                return text(status, &format!("Envoy's admin {e}\n"));
            }
        };
        let (head, body) = response.into_parts();
        let mut answer = hyper::Response::new(body.map_err(Into::into).boxed_unsync());
        *answer.status_mut() = head.status;
        if let Some(kind) = head.headers.get(hyper::header::CONTENT_TYPE) {
            answer.headers_mut().insert(hyper::header::CONTENT_TYPE, kind.clone());
        }
        // The connection's end was set for this answer: the next request must not inherit it.
        answer.headers_mut().insert(hyper::header::CONNECTION, hyper::header::HeaderValue::from_static("close"));
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(uri: &str) -> Option<String> {
        admin_path(&uri.parse().expect("uri"))
    }

    #[test]
    fn only_the_readable_paths_pass_with_their_query() {
        assert_eq!(path("/envoy/stats/prometheus"), Some("/stats/prometheus".into()));
        assert_eq!(
            path("/envoy/stats/prometheus?usedonly&filter=%5Eserver"),
            Some("/stats/prometheus?usedonly&filter=%5Eserver".into())
        );
        assert_eq!(path("/envoy/server_info"), Some("/server_info".into()));
        assert_eq!(path("/envoy/stats?format=json"), Some("/stats?format=json".into()));
        for refused in [
            "/envoy/quitquitquit",
            "/envoy/drain_listeners?graceful",
            "/envoy/config_dump",
            "/envoy/stats/../config_dump",
            "/envoy/stats/prometheus/",
            "/envoy//stats",
            "/envoy",
            "/envoy/",
            "/envoystats",
            "/stats",
        ] {
            assert_eq!(path(refused), None, "{refused}");
        }
    }
}
