//! Certificates handed to Envoy through file-based SDS (`--cert-reload in-place`): the bootstrap is
//! rewritten so that every static certificate and CA it names by file is a secret that sesame
//! writes (`rewrite`), with the bytes that passed its checks (`secrets`). Envoy swaps a secret when
//! its file is renamed into the watched directory: no new epoch, no connection touched. A rotation
//! (`rotate`) writes what changed and reads Envoy's answer back.

mod ambiguous;
mod inline;
mod prepare;
mod rewrite;
mod rotate;
mod secrets;

pub use ambiguous::ambiguous_scalar;
pub use prepare::{Prepared, SdsFiles};
pub use rewrite::{Secret, SecretFiles, ensure_node, rewrite};
pub use rotate::{Outcome, attempt};
pub use secrets::{CheckedSecret, check_secret, check_secrets, write_secret, write_secret_file};
