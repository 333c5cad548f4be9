//! The checks of a reload that run away from the supervisor: the preflight (the bootstrap, every
//! certificate/key pair, what the Envoy user can read, for a cold handover the ports), and the
//! verdicts read off the checkers the supervisor runs as its children (`envoy --mode validate`,
//! `envoy --hot-restart-version`). Each returns its result; none starts or signals a process. The
//! supervisor's `checks` sub-machine puts them in order.

mod binary;
mod input;
mod preflight;
mod verdicts;

pub use binary::BinaryId;
pub use input::Input;
pub use preflight::{Preflight, preflight};
pub use verdicts::{Compatibility, hot_restart_compatibility, validation_verdict};
