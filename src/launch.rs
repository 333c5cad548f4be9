//! What to run: the user's command as given, an Envoy command with the launcher's flags, or the
//! embedded demo when no command is given.

use std::ffi::OsString;
use std::os::unix::fs::DirBuilderExt;

use anyhow::Context;

use crate::cli::RunOptions;
use crate::demo::Demo;
use crate::envoy;

/// The command the supervisor starts, and whether it is Envoy (drain and hot restart apply) or any
/// other program (a plain init).
#[derive(Debug, Clone)]
pub struct Launch {
    pub argv: Vec<OsString>,
    pub is_envoy: bool,
}

pub fn plan(options: &RunOptions) -> anyhow::Result<Launch> {
    let runtime_dir = options.runtime_dir();
    let command = if options.command.is_empty() {
        let demo = Demo::new(&runtime_dir);
        demo.prepare(options.demo_http_port, options.demo_https_port)?;
        tracing::info!(
            "no command given: running the demo (http://127.0.0.1:{}/, https://127.0.0.1:{}/, certificate {})",
            options.demo_http_port,
            options.demo_https_port,
            demo.cert.display()
        );
        vec![options.envoy_bin.clone().into(), "-c".into(), demo.bootstrap.into()]
    } else {
        options.command.clone()
    };
    let is_envoy = envoy::is_envoy_command(&command[0], &options.envoy_bin);
    let argv = if is_envoy {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&runtime_dir)
            .with_context(|| format!("cannot create the runtime directory {}", runtime_dir.display()))?;
        envoy::first_epoch_command(&command, &runtime_dir.join("envoy-base-id"))
    } else {
        tracing::info!(
            "'{}' is not Envoy: running it under a plain init (no drain, no hot restart)",
            command[0].to_string_lossy()
        );
        command
    };
    Ok(Launch { argv, is_envoy })
}
