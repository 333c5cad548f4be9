//! What to run: the user's command as given, an Envoy command with the launcher's flags, or the
//! embedded demo when no command is given; and, for Envoy, where its admin API is.

use std::ffi::OsString;

use crate::admin::{AdminAddress, AdminClient};
use crate::bootstrap::Bootstrap;
use crate::cli::RunOptions;
use crate::demo::{Demo, create_private_dir};
use crate::envoy;

/// The command the supervisor starts, and whether it is Envoy (drain and hot restart apply) or any
/// other program (a plain init).
#[derive(Debug, Clone)]
pub struct Launch {
    pub argv: Vec<OsString>,
    pub is_envoy: bool,
    /// Envoy's admin API; None for a plain command, or when no admin address is known.
    pub admin: Option<AdminClient>,
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
    if !envoy::is_envoy_command(&command[0], &options.envoy_bin) {
        tracing::info!(
            "'{}' is not Envoy: running it under a plain init (no drain, no hot restart)",
            command[0].to_string_lossy()
        );
        return Ok(Launch { argv: command, is_envoy: false, admin: None });
    }
    create_private_dir(&runtime_dir)?;
    let argv = envoy::first_epoch_command(&command, &runtime_dir.join("envoy-base-id"), &options.envoy_flags.flags());
    let admin = options.admin.clone().or_else(|| admin_from_bootstrap(&argv));
    match &admin {
        Some(address) => tracing::info!("Envoy's admin API: {address}"),
        None => tracing::warn!(
            "no admin address found (give --admin, or an admin.address in the bootstrap): \
             SIGTERM will reach Envoy without a graceful drain"
        ),
    }
    Ok(Launch { argv, is_envoy: true, admin: admin.map(AdminClient::new) })
}

fn admin_from_bootstrap(argv: &[OsString]) -> Option<AdminAddress> {
    match Bootstrap::from_command(argv) {
        Ok(bootstrap) => bootstrap?.admin_address(),
        Err(e) => {
            // Envoy will refuse a broken bootstrap itself, with its own reason; ours is a hint.
            tracing::warn!("{e:#}");
            None
        }
    }
}
