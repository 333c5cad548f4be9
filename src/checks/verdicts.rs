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

/// Reads what `envoy --mode validate` printed and turns its exit into the verdict: a non-zero
/// status is its "no"; a death by a signal (the OOM killer, a crash) is no verdict on the input.
pub async fn validation_verdict(exit: Exit, output: PathBuf) -> Result<(), Refusal> {
    if exit == Exit::Code(0) {
        return Ok(());
    }
    let text = tokio::fs::read_to_string(&output).await.unwrap_or_default();
    let why = format!("envoy --mode validate failed ({exit}): {}", last_error_line(&text));
    Err(match exit {
        Exit::Signal(_) => Refusal::Fault(why),
        Exit::Code(_) => Refusal::Invalid(why),
    })
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
        // Not the user's files: the new binary cannot say whether a hot restart to it can work.
        return Err(Refusal::Fault(format!("envoy --hot-restart-version failed ({exit}): {}", last_error_line(&text))));
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

    #[tokio::test]
    async fn only_a_validator_that_says_no_refuses_the_input() {
        let dir = tempfile::tempdir().expect("tempdir");
        let output = dir.path().join("out.log");
        std::fs::write(&output, "[x][critical][main] error: bad cert\n").expect("write");
        assert_eq!(validation_verdict(Exit::Code(0), output.clone()).await, Ok(()));
        let said_no = validation_verdict(Exit::Code(1), output.clone()).await;
        assert!(matches!(said_no, Err(Refusal::Invalid(ref why)) if why.ends_with("error: bad cert")), "{said_no:?}");
        let died = validation_verdict(Exit::Signal(libc::SIGKILL), output.clone()).await;
        assert!(matches!(died, Err(Refusal::Fault(_))), "killed by someone else: no verdict on the input: {died:?}");
        let crashed = validation_verdict(Exit::Signal(libc::SIGSEGV), output.clone()).await;
        assert!(matches!(crashed, Err(Refusal::Fault(_))), "{crashed:?}");
        let no_version = hot_restart_compatibility(Exit::Code(1), output, None).await;
        assert!(matches!(no_version, Err(Refusal::Fault(_))), "a broken new binary is no bad input: {no_version:?}");
    }
}
