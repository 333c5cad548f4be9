//! Whether a new Envoy family can bind its listeners beside the serving one (a cold handover): every
//! static listener must allow SO_REUSEPORT, and no port may be held by a process other than our
//! own Envoy. Checked before the new family starts, so that a handover that cannot work is refused
//! with its reason and the serving family is never touched.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use procfs::net::TcpState;

use crate::bootstrap::ListenerBind;

/// Why a new family could not bind a listener beside the serving one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortConflict {
    #[error(
        "listener '{name}' ({host}:{port}) sets enable_reuse_port: false: a new Envoy family cannot bind beside the \
         serving one"
    )]
    NoReusePort { name: String, host: String, port: u16 },
    #[error(
        "listener '{name}' ({host}:{port}): the port is held by {holder}, not by the serving Envoy: a new Envoy \
         family cannot bind it"
    )]
    HeldByOther { name: String, host: String, port: u16, holder: String },
}

/// Refuses `binds` that the new family could not take beside the processes `ours`.
pub fn check_handover(binds: &[ListenerBind], ours: &[i32]) -> Result<(), PortConflict> {
    if let Some(bind) = binds.iter().find(|b| !b.reuse_port) {
        return Err(PortConflict::NoReusePort { name: bind.name.clone(), host: bind.host.clone(), port: bind.port });
    }
    let listening = listening_sockets();
    let wanted: HashSet<u16> = binds.iter().map(|b| b.port).collect();
    let relevant: Vec<&Listening> = listening.iter().filter(|l| wanted.contains(&l.port)).collect();
    if relevant.is_empty() {
        return Ok(());
    }
    let owners = socket_owners(&relevant.iter().map(|l| l.inode).collect());
    let hidden = hidden_uids(ours);
    for bind in binds {
        let host: Option<IpAddr> = bind.host.parse().ok();
        for socket in relevant.iter().filter(|l| l.port == bind.port && overlaps(host, l.address)) {
            let pids = owners.get(&socket.inode).cloned().unwrap_or_default();
            if pids.iter().any(|pid| ours.contains(pid)) {
                continue;
            }
            // A root without CAP_SYS_PTRACE (a container's default) cannot read the open files of
            // its Envoy running as another user: a socket nobody visible holds, owned by that
            // user, is taken for that Envoy's (SO_REUSEPORT lets only the same user share it).
            if pids.is_empty() && hidden.contains(&socket.uid) {
                continue;
            }
            let holder = match pids.first() {
                Some(pid) => format!("pid {pid} ({})", command_name(*pid)),
                None => format!("a process sesame cannot see (uid {})", socket.uid),
            };
            return Err(PortConflict::HeldByOther {
                name: bind.name.clone(),
                host: bind.host.clone(),
                port: bind.port,
                holder,
            });
        }
    }
    Ok(())
}

const TCP_MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// Before the old family stops listening: connections the kernel has queued on its listening
/// sockets (handshake done, not yet accepted) are reset when they close, unless
/// `net.ipv4.tcp_migrate_req` is 1 (Linux 5.14+), which moves them to another socket of the same
/// reuseport group: the new family's. sesame sets it when it may (its network namespace's, as root);
/// when it may not, it says what that costs.
pub fn migrate_queued_connections() {
    match std::fs::read_to_string(TCP_MIGRATE_REQ).map(|v| v.trim().to_string()) {
        Ok(value) if value == "1" => {}
        Ok(_) => match std::fs::write(TCP_MIGRATE_REQ, "1") {
            Ok(()) => tracing::info!(
                "set net.ipv4.tcp_migrate_req=1 (it was 0): connections queued on the old family's listeners move to \
                 the new family's when they close, instead of being reset (--no-tcp-migrate-req leaves it alone)"
            ),
            Err(e) => tracing::warn!(
                "cannot set net.ipv4.tcp_migrate_req=1 ({e}): connections queued on the old family's listeners when \
                 they close are reset (set it with docker run --sysctl net.ipv4.tcp_migrate_req=1, or a pod's \
                 securityContext.sysctls)"
            ),
        },
        Err(e) => tracing::warn!(
            "cannot read net.ipv4.tcp_migrate_req ({e}, Linux before 5.14?): connections queued on the old \
             family's listeners when they close are reset"
        ),
    }
}

struct Listening {
    address: IpAddr,
    port: u16,
    inode: u64,
    uid: u32,
}

fn listening_sockets() -> Vec<Listening> {
    let v4 = procfs::net::tcp().unwrap_or_default();
    let v6 = procfs::net::tcp6().unwrap_or_default();
    v4.into_iter()
        .chain(v6)
        .filter(|e| e.state == TcpState::Listen)
        .map(|e| Listening { address: e.local_address.ip(), port: e.local_address.port(), inode: e.inode, uid: e.uid })
        .collect()
}

/// Whether a listener on `wanted` (None: unparsable, taken as any) and one on `held` collide.
fn overlaps(wanted: Option<IpAddr>, held: IpAddr) -> bool {
    match wanted {
        None => true,
        Some(wanted) => wanted.is_unspecified() || held.is_unspecified() || wanted == held,
    }
}

/// The pids holding each of `inodes` open, from every process's open files.
fn socket_owners(inodes: &HashSet<u64>) -> HashMap<u64, Vec<i32>> {
    let mut owners: HashMap<u64, Vec<i32>> = HashMap::new();
    let Ok(processes) = procfs::process::all_processes() else { return owners };
    for process in processes.flatten() {
        let Ok(fds) = process.fd() else { continue };
        for fd in fds.flatten() {
            if let procfs::process::FDTarget::Socket(inode) = fd.target
                && inodes.contains(&inode)
            {
                owners.entry(inode).or_default().push(process.pid);
            }
        }
    }
    owners
}

/// The users of the processes `ours` whose open files sesame cannot read. With CAP_DAC_OVERRIDE the
/// list of a process's descriptors can be read, and still not where one of them leads.
fn hidden_uids(ours: &[i32]) -> HashSet<u32> {
    let hidden = |pid: i32| match std::fs::read_dir(format!("/proc/{pid}/fd")) {
        Ok(mut fds) => fds.next().and_then(Result::ok).is_some_and(|fd| {
            std::fs::read_link(fd.path()).is_err_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied)
        }),
        Err(_) => true,
    };
    ours.iter()
        .filter(|pid| hidden(**pid))
        .filter_map(|pid| procfs::process::Process::new(*pid).ok()?.uid().ok())
        .collect()
}

fn command_name(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).map(|c| c.trim().to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind(port: u16, reuse_port: bool) -> ListenerBind {
        ListenerBind { name: "web".into(), host: "127.0.0.1".into(), port, reuse_port }
    }

    #[test]
    fn a_listener_without_reuse_port_is_refused_by_name() {
        let refused = check_handover(&[bind(1, false)], &[]).expect_err("refused").to_string();
        assert!(refused.contains("listener 'web' (127.0.0.1:1) sets enable_reuse_port: false"), "{refused}");
    }

    #[test]
    fn a_port_held_by_another_process_is_refused_and_ours_is_not() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = held.local_addr().expect("addr").port();
        let refused = check_handover(&[bind(port, true)], &[]).expect_err("held by the test").to_string();
        assert!(refused.contains(&format!("pid {}", std::process::id())), "{refused}");
        let me = i32::try_from(std::process::id()).expect("pid");
        assert_eq!(check_handover(&[bind(port, true)], &[me]), Ok(()));
        drop(held);
        assert_eq!(check_handover(&[bind(port, true)], &[]), Ok(()), "free again");
    }

    #[test]
    fn wildcards_collide_with_every_address() {
        let any: IpAddr = "0.0.0.0".parse().expect("ip");
        let lo: IpAddr = "127.0.0.1".parse().expect("ip");
        let other: IpAddr = "127.0.0.2".parse().expect("ip");
        assert!(overlaps(Some(any), lo) && overlaps(Some(lo), any) && overlaps(Some(lo), lo));
        assert!(!overlaps(Some(lo), other));
    }
}
