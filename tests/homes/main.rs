//! sesame in its homes, for real (`make test-homes`): under a booted systemd (systemd-nspawn), as
//! the entrypoint of the Dockerfile's image built and run by podman, and with a pod's restricted
//! settings. What they run on is made by tests/homes/setup.sh (`make homes`).

#[path = "../common/mod.rs"]
mod common;
mod image;
mod machine;
mod pod;
mod podman;
mod site;
mod systemd;
