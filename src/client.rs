//! The client subcommands: `sesame shutdown`, `reload` and `status` talk to a running launcher
//! over its control socket, found as the launcher finds it.

use std::time::Duration;

use hyper::{Method, StatusCode};

use crate::cli::Location;
use crate::http::{Endpoint, HttpClient, HttpError};

/// Writes a line to stdout. A reader that went away (`sesame status | head -c1`) is not an error
/// worth a panic: the rest of the output is simply not wanted.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// Writes a line to stderr, quietly when stderr is gone.
fn say_err(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Exit statuses of the clients.
const OK: i32 = 0;
const REFUSED: i32 = 1;
const UNREACHABLE: i32 = 2;

fn block_on<T>(future: impl Future<Output = T>) -> Option<T> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
    match runtime {
        Ok(runtime) => Some(runtime.block_on(future)),
        Err(e) => {
            say_err(&format!("sesame: cannot start the runtime: {e}"));
            None
        }
    }
}

fn ask(location: &Location, method: Method, path: &str, timeout: Duration) -> Result<(StatusCode, String), i32> {
    let client = HttpClient::new(Endpoint::Unix(location.control_socket()), timeout);
    match block_on(client.request(method, path)) {
        Some(Ok((status, body))) => Ok((status, String::from_utf8_lossy(&body).into_owned())),
        // The launcher is there but the answer takes longer than the caller waits (a reload held
        // while Envoy initializes, say): that is an answer not given yet, not an absent launcher.
        Some(Err(HttpError::Timeout(..))) if path != "/status" => {
            let step = ask(location, Method::GET, "/status", Duration::from_secs(2))
                .ok()
                .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
                .and_then(|status| status["reload"].as_str().map(str::to_string));
            match step {
                Some(step) => say_err(&format!("sesame: {path} not finished within {timeout:?}: {step}")),
                None => say_err(&format!("sesame: {path} not finished within {timeout:?}")),
            }
            Err(REFUSED)
        }
        Some(Err(e)) => {
            say_err(&format!("sesame: {e}"));
            Err(UNREACHABLE)
        }
        None => Err(UNREACHABLE),
    }
}

pub fn shutdown(location: &Location, wait_timeout: Duration) -> i32 {
    match ask(location, Method::POST, "/shutdown", wait_timeout) {
        Ok((StatusCode::OK, _)) => {
            say("drained");
            OK
        }
        Ok((status, body)) => {
            say_err(&format!("sesame: shutdown: {status}: {}", body.trim()));
            REFUSED
        }
        Err(code) => code,
    }
}

pub fn reload(location: &Location, cold: bool, wait_timeout: Duration) -> i32 {
    let path = if cold { "/reload?cold=true" } else { "/reload" };
    match ask(location, Method::POST, path, wait_timeout) {
        Ok((StatusCode::OK, body)) => {
            let epoch = serde_json::from_str::<serde_json::Value>(&body).ok().and_then(|v| v.get("epoch")?.as_u64());
            say(&format!("epoch {} is LIVE", epoch.map_or_else(|| "?".into(), |e| e.to_string())));
            OK
        }
        Ok((status, body)) => {
            let reason = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| Some(v.get("error")?.as_str()?.to_string()))
                .unwrap_or(body);
            say_err(&format!("sesame: reload failed ({status}): {}", reason.trim()));
            REFUSED
        }
        Err(code) => code,
    }
}

pub fn status(location: &Location, json: bool) -> i32 {
    let (status, body) = match ask(location, Method::GET, "/status", Duration::from_secs(5)) {
        Ok(answer) => answer,
        Err(code) => return code,
    };
    let Ok(value) = serde_json::from_str::<serde_json::Value>(&body) else {
        say_err(&format!("sesame: status: {status}: {}", body.trim()));
        return UNREACHABLE;
    };
    if json {
        say(&body);
    } else {
        say(summary(&value).trim_end());
    }
    if value.get("ready").and_then(serde_json::Value::as_bool) == Some(true) { OK } else { REFUSED }
}

fn rfc3339(unix: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

/// The human summary of /status.
fn summary(status: &serde_json::Value) -> String {
    let text = |v: &serde_json::Value| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
    let readiness = match status["not_ready"].as_str() {
        _ if status["ready"].as_bool() == Some(true) => " (ready)".to_string(),
        Some(why) => format!(" (not ready: {why})"),
        None => " (not ready)".to_string(),
    };
    let mut out = format!("state: {}{readiness}\ncurrent epoch: {}\n", text(&status["state"]), status["current_epoch"]);
    for epoch in status["epochs"].as_array().into_iter().flatten() {
        let exits = epoch["exits_by_unix"].as_u64().map(|at| format!(", exits by {}", rfc3339(at))).unwrap_or_default();
        let family = match epoch["family"].as_u64() {
            Some(family) if family > 0 => format!(" (family {family}, restart epoch {})", epoch["restart_epoch"]),
            _ => String::new(),
        };
        out += &format!("  epoch {} pid {} {}{family}{exits}\n", epoch["epoch"], epoch["pid"], text(&epoch["state"]));
    }
    let envoy = &status["envoy"];
    if let Some(state) = envoy["state"].as_str() {
        out += &format!("Envoy says: {state} (restart epoch {})\n", envoy["restart_epoch"]);
    } else if let Some(error) = envoy["error"].as_str() {
        let last = envoy["answered_unix"].as_u64().map_or_else(|| "never".to_string(), rfc3339);
        out += &format!("Envoy's admin does not answer: {error} (last answer: {last})\n");
    }
    if let Some(note) = envoy["note"].as_str() {
        out += &format!("NOTE: {note}\n");
    }
    for warning in status["warnings"].as_array().into_iter().flatten() {
        out += &format!("WARNING: {}\n", text(warning));
    }
    if let Some(step) = status["reload"].as_str() {
        out += &format!("reload under way: {step}\n");
    }
    if let Some(reload) = status["last_reload"].as_object() {
        out += &format!("last reload: {} ({})\n", text(&reload["result"]), text(&reload["detail"]));
    }
    for certificate in status["certificates"].as_array().into_iter().flatten() {
        let serial = certificate["serial"].as_str().map(|s| format!(" serial {s}")).unwrap_or_default();
        let expires = certificate["not_after_unix"].as_u64().map(|at| format!(", expires {}", rfc3339(at)));
        let rotated = certificate["rotated_at_unix"].as_u64().map(rfc3339).unwrap_or_default();
        out += &format!(
            "certificate {}{serial}{}: {} at {rotated}, Envoy: {}\n",
            text(&certificate["path"]),
            expires.unwrap_or_default(),
            text(&certificate["rotated"]),
            text(&certificate["envoy"])
        );
        if let Some(refused) = certificate["refused"].as_object() {
            out += &format!("  refused: {}\n", text(&refused["detail"]));
        }
    }
    if let Some(degraded) = status["degraded"].as_str() {
        out += &format!("DEGRADED: {degraded}\n");
    }
    let recovery = &status["recovery"];
    if let Some(next) = recovery["next_attempt_in_seconds"].as_f64() {
        out += &format!("cold handover in {next:.1}s ({} failed in a row)\n", recovery["failures_in_a_row"]);
    }
    if let Some(last) = recovery["last"].as_object() {
        out += &format!("last cold handover: {} ({})\n", text(&last["result"]), text(&last["detail"]));
    }
    if let Some(drain) = status["drain"].as_object() {
        out += &format!(
            "draining for {:.1}s, connections: {}\n",
            drain["elapsed_seconds"].as_f64().unwrap_or(0.0),
            drain["connections"]
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_names_each_certificate_and_its_refusal() {
        let status = serde_json::json!({
            "state": "running", "ready": true, "current_epoch": 0, "epochs": [],
            "certificates": [{
                "path": "/etc/envoy/tls.crt", "serial": "1a", "not_after_unix": 1_800_000_000u64,
                "rotated": "in-place", "rotated_at_unix": 1_790_000_000u64, "envoy": "confirmed",
                "refused": { "result": "refused", "detail": "private key /etc/envoy/tls.key does not match", "at_unix": 1 },
            }],
        });
        let text = summary(&status);
        assert!(
            text.contains("certificate /etc/envoy/tls.crt serial 1a, expires 2027-01-15T08:00:00Z: in-place at"),
            "{text}"
        );
        assert!(text.contains("Envoy: confirmed\n  refused: private key /etc/envoy/tls.key does not match"), "{text}");
    }
}
