//! The verdicts of the checkers the supervisor runs as its children, read from their exit and
//! their output file.

use std::path::PathBuf;

use crate::admin::AdminClient;
use crate::outcome::Refusal;
use crate::process::Exit;

/// Whether a hot restart from the serving binary to a new one can work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compatibility {
    Compatible,
    /// It cannot (or that is not known): a cold handover instead, for this reason.
    Incompatible(String),
}

/// Reads what `envoy --mode validate` printed and turns its exit into the verdict.
pub async fn validation_verdict(exit: Exit, output: PathBuf) -> Result<(), Refusal> {
    if exit == Exit::Code(0) {
        return Ok(());
    }
    let text = tokio::fs::read_to_string(&output).await.unwrap_or_default();
    Err(Refusal::Invalid(format!("envoy --mode validate failed ({exit}): {}", last_error_line(&text))))
}

/// Whether the binary that `envoy --hot-restart-version` ran as (`exit`, its output in `output`)
/// can hot-restart the serving epoch (`serving`, its admin).
pub async fn hot_restart_compatibility(
    exit: Exit,
    output: PathBuf,
    serving: Option<AdminClient>,
) -> Result<Compatibility, Refusal> {
    let text = tokio::fs::read_to_string(&output).await.unwrap_or_default();
    if exit != Exit::Code(0) {
        return Err(Refusal::Invalid(format!(
            "envoy --hot-restart-version failed ({exit}): {}",
            last_error_line(&text)
        )));
    }
    // Envoy prints it on stderr, as a log line or bare, depending on the version.
    let new = last_error_line(&text);
    let running = match serving {
        Some(admin) => admin.server_info().await.ok().and_then(|info| info.hot_restart_version),
        None => None,
    };
    Ok(match running {
        Some(running) if running == new => Compatibility::Compatible,
        Some(running) => Compatibility::Incompatible(format!(
            "the new Envoy binary's hot restart version is {new}, the serving one's {running}"
        )),
        None => Compatibility::Incompatible(format!(
            "the serving epoch's hot restart version is not known (the new binary's is {new})"
        )),
    })
}

/// The line of Envoy's output that says what is wrong: the last non-empty one, without the log prefix.
fn last_error_line(text: &str) -> String {
    let line = text.lines().rev().map(str::trim).find(|l| !l.is_empty()).unwrap_or("no output");
    // "[2026-11-27 09:03:29.125][2][critical][main] [source/...] error: ..." → after the last "] ".
    line.rsplit_once("] ").map_or(line, |(_, message)| message).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reason_is_the_last_line_without_log_prefix() {
        let output = "[2026-11-27 09:03:29.125][2][info][main] starting\n\
                      [2026-11-27 09:03:29.126][2][critical][main] [source/server/server.cc:100] error initializing configuration: Failed to load certificate chain from /c/a.crt\n\n";
        assert_eq!(
            last_error_line(output),
            "error initializing configuration: Failed to load certificate chain from /c/a.crt"
        );
        assert_eq!(last_error_line(""), "no output");
    }
}
