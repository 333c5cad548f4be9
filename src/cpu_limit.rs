//! How many worker threads Envoy should start. Envoy sizes its workers by the host's CPUs (1.40
//! narrows that by the affinity mask and by a quota on its own cgroup only, rounded down), so a
//! quota set on an ancestor cgroup (a pod, a systemd slice) leaves it with a worker per host CPU
//! that the CFS quota throttles. The quota is read from the cgroups the launcher is in (Envoy
//! inherits them): cgroup v2 `cpu.max`, cgroup v1 `cpu.cfs_quota_us` and `cpu.cfs_period_us`, the
//! smallest on the path from the process's own cgroup up to the root of the hierarchy, since every
//! ancestor's limit applies too.

use std::path::{Path, PathBuf};
use std::str::FromStr;

/// What `--envoy-concurrency` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConcurrencySetting {
    /// From the CPU quota and the affinity mask.
    Auto,
    Fixed(u32),
    /// Leave Envoy to pick.
    Off,
}

impl FromStr for ConcurrencySetting {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim() {
            "auto" => Ok(ConcurrencySetting::Auto),
            "off" => Ok(ConcurrencySetting::Off),
            number => match number.parse::<u32>() {
                Ok(n) if n > 0 => Ok(ConcurrencySetting::Fixed(n)),
                _ => Err(format!("'{text}' is not auto, off or a number of workers above 0")),
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

/// A CPU quota: `quota_us` of CPU time every `period_us`, set in the cgroup directory `dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quota {
    pub version: CgroupVersion,
    pub quota_us: u64,
    pub period_us: u64,
    pub dir: PathBuf,
}

impl Quota {
    /// The CPUs the quota buys, rounded up: two workers can use all of 1.5 CPUs, one worker (a
    /// thread runs on one CPU at a time) never more than one.
    pub fn cpus(&self) -> u32 {
        let cpus = self.quota_us.div_ceil(self.period_us.max(1));
        u32::try_from(cpus).unwrap_or(u32::MAX).max(1)
    }

    /// Whether this quota allows less CPU than `other` (compared as fractions, exactly).
    fn tighter_than(&self, other: &Quota) -> bool {
        u128::from(self.quota_us) * u128::from(other.period_us)
            < u128::from(other.quota_us) * u128::from(self.period_us)
    }
}

impl std::fmt::Display for Quota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dir = self.dir.display();
        match self.version {
            CgroupVersion::V2 => write!(f, "cgroup v2 cpu.max {} {} at {dir}", self.quota_us, self.period_us),
            CgroupVersion::V1 => {
                write!(f, "cgroup v1 cpu.cfs_quota_us {} cpu.cfs_period_us {} at {dir}", self.quota_us, self.period_us)
            }
        }
    }
}

/// One line of /proc/self/mountinfo that mounts a cgroup hierarchy.
#[derive(Debug, PartialEq, Eq)]
struct CgroupMount {
    version: CgroupVersion,
    /// The cgroup the mount shows at its mount point (not `/` when a container sees part of it).
    root: String,
    mount_point: PathBuf,
    /// The v1 controllers it holds (`cpu`, `cpuacct`, ...).
    controllers: Vec<String>,
}

/// The cgroup mounts of a /proc/self/mountinfo: `ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS
/// [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS`.
fn cgroup_mounts(mountinfo: &str) -> Vec<CgroupMount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let fields: Vec<&str> = before.split(' ').collect();
            let (root, mount_point) = (fields.get(3)?, fields.get(4)?);
            let mut after = after.split(' ');
            let version = match after.next()? {
                "cgroup2" => CgroupVersion::V2,
                "cgroup" => CgroupVersion::V1,
                _ => return None,
            };
            let super_options = after.nth(1).unwrap_or("");
            Some(CgroupMount {
                version,
                root: unescape(root),
                mount_point: PathBuf::from(unescape(mount_point)),
                controllers: super_options.split(',').map(str::to_string).collect(),
            })
        })
        .collect()
}

/// mountinfo writes a space, a tab, a newline and a backslash in a path as octal escapes (`\040`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroups of /proc/self/cgroup that can hold a CPU quota: the v2 one (`0::PATH`) and the v1
/// hierarchy with the `cpu` controller (`N:cpu,cpuacct:PATH`).
fn cpu_cgroups(proc_cgroup: &str) -> Vec<(CgroupVersion, String)> {
    proc_cgroup
        .lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (id, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            if id == "0" && controllers.is_empty() {
                Some((CgroupVersion::V2, path.to_string()))
            } else if controllers.split(',').any(|c| c == "cpu") {
                Some((CgroupVersion::V1, path.to_string()))
            } else {
                None
            }
        })
        .collect()
}

/// The quota set in one cgroup directory, if any: `max` (v2) and `-1` (v1) mean none, and so does
/// a missing or unreadable file (the root cgroup has none, the controller may not be enabled).
fn quota_in(version: CgroupVersion, dir: &Path) -> Option<Quota> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let (quota, period) = match version {
        CgroupVersion::V2 => {
            let text = read("cpu.max")?;
            let mut fields = text.split_whitespace();
            let quota = fields.next()?;
            let period = fields.next().unwrap_or("100000");
            (quota.parse().ok()?, period.parse().ok()?)
        }
        CgroupVersion::V1 => {
            let quota: i64 = read("cpu.cfs_quota_us")?.trim().parse().ok()?;
            let period = read("cpu.cfs_period_us")?.trim().parse().ok()?;
            (u64::try_from(quota).ok()?, period)
        }
    };
    (quota > 0 && period > 0).then(|| Quota { version, quota_us: quota, period_us: period, dir: dir.to_path_buf() })
}

/// `path` below the cgroup `root` (both absolute cgroup paths), without its leading `/`; None when
/// it is not below it or climbs out of it.
fn relative_to<'a>(path: &'a str, root: &str) -> Option<&'a str> {
    let rest = path.strip_prefix(root.trim_end_matches('/'))?;
    if !(rest.is_empty() || rest.starts_with('/')) || rest.split('/').any(|part| part == "..") {
        return None;
    }
    Some(rest.trim_start_matches('/'))
}

/// The tightest CPU quota that applies to the process whose /proc/PID/cgroup and mountinfo are
/// given, reading the cgroup files under `root` (`/` for real; a fixture tree in tests).
pub fn find_quota(proc_cgroup: &str, mountinfo: &str, root: &Path) -> Option<Quota> {
    let mounts = cgroup_mounts(mountinfo);
    let mut tightest: Option<Quota> = None;
    for (version, path) in cpu_cgroups(proc_cgroup) {
        let holds_cpu = |m: &CgroupMount| version == CgroupVersion::V2 || m.controllers.iter().any(|c| c == "cpu");
        let mount = mounts.iter().filter(|m| m.version == version && holds_cpu(m));
        // The mount that shows the process's cgroup; without one (a cgroup namespace whose path
        // reads "/.."), the top of any mount of the hierarchy is the nearest thing to read.
        let found = mount.clone().find_map(|m| Some((m, relative_to(&path, &m.root)?)));
        let Some((mount, relative)) = found.or_else(|| mount.clone().next().map(|m| (m, ""))) else { continue };
        let top = root.join(mount.mount_point.strip_prefix("/").unwrap_or(&mount.mount_point));
        let mut dir = top.join(relative);
        loop {
            if let Some(quota) = quota_in(version, &dir)
                && tightest.as_ref().is_none_or(|t| quota.tighter_than(t))
            {
                tightest = Some(quota);
            }
            if dir == top || !dir.pop() {
                break;
            }
        }
    }
    tightest
}

/// The number of CPUs in a kernel CPU list (`0-3,8,10-11`), as in /sys/devices/system/cpu/online.
fn cpu_list_count(list: &str) -> Option<u32> {
    let mut count = 0;
    for range in list.trim().split(',').filter(|r| !r.is_empty()) {
        count += match range.split_once('-') {
            Some((first, last)) => last.parse::<u32>().ok()?.checked_sub(first.parse().ok()?)? + 1,
            None => range.parse::<u32>().map(|_| 1).ok()?,
        };
    }
    (count > 0).then_some(count)
}

/// `--concurrency` from what limits the CPUs, and one line that says what was chosen and why.
/// `allowed` is the size of the affinity mask, `online` the host's online CPUs. Without a quota,
/// the affinity mask decides only when it is narrower than the host (a `taskset` or a cpuset): Envoy
/// would otherwise start a worker per online CPU, and when every online CPU is allowed that is
/// already right, so nothing is passed.
pub fn choose(quota: Option<&Quota>, allowed: Option<u32>, online: Option<u32>) -> (Option<u32>, String) {
    match (quota, allowed) {
        (Some(quota), Some(allowed)) if allowed < quota.cpus() => (
            Some(allowed.max(1)),
            format!("--concurrency {}: {quota} allows {} CPUs, the affinity mask only {allowed}", allowed.max(1), quota.cpus()),
        ),
        (Some(quota), _) => (Some(quota.cpus()), format!("--concurrency {}: {quota}", quota.cpus())),
        (None, Some(allowed)) if online.is_some_and(|online| allowed < online) => (
            Some(allowed.max(1)),
            format!(
                "--concurrency {}: no CPU quota, and the affinity mask allows {allowed} of the {} online CPUs",
                allowed.max(1),
                online.unwrap_or(allowed)
            ),
        ),
        (None, _) => (
            None,
            "no --concurrency: no CPU quota in sesame's cgroups and every online CPU is allowed (Envoy starts one worker \
             per CPU)"
                .to_string(),
        ),
    }
}

/// `choose` for this process: its cgroups, its affinity mask, the host's online CPUs.
pub fn auto_concurrency() -> (Option<u32>, String) {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let quota = find_quota(&read("/proc/self/cgroup"), &read("/proc/self/mountinfo"), Path::new("/"));
    let allowed = match nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) {
        Ok(set) => {
            let count = (0..nix::sched::CpuSet::count()).filter(|&cpu| set.is_set(cpu).unwrap_or(false)).count();
            u32::try_from(count).ok().filter(|&n| n > 0)
        }
        Err(e) => {
            tracing::debug!("sched_getaffinity: {e}");
            None
        }
    };
    let online = cpu_list_count(&read("/sys/devices/system/cpu/online"));
    choose(quota.as_ref(), allowed, online)
}

#[cfg(test)]
mod tests {
    use super::*;

    const V2_MOUNTINFO: &str = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
    const V1_MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    /// A fixture tree: each (path, contents) written under a fresh root.
    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let root = tempfile::tempdir().expect("tempdir");
        for (path, contents) in files {
            let file = root.path().join(path);
            std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
            std::fs::write(file, contents).expect("write");
        }
        root
    }

    fn v2(quota: u64, period: u64, dir: &Path) -> Quota {
        Quota { version: CgroupVersion::V2, quota_us: quota, period_us: period, dir: dir.to_path_buf() }
    }

    #[test]
    fn v2_takes_the_tightest_limit_on_the_way_up() {
        let root = tree(&[
            ("sys/fs/cgroup/cpu.stat", ""),
            ("sys/fs/cgroup/kubepods/cpu.max", "400000 100000\n"),
            ("sys/fs/cgroup/kubepods/pod1/cpu.max", "150000 100000\n"),
            ("sys/fs/cgroup/kubepods/pod1/envoy/cpu.max", "max 100000\n"),
        ]);
        let cgroup = "0::/kubepods/pod1/envoy\n";
        let quota = find_quota(cgroup, V2_MOUNTINFO, root.path()).expect("a quota");
        assert_eq!(quota, v2(150000, 100000, &root.path().join("sys/fs/cgroup/kubepods/pod1")));
        assert_eq!(quota.cpus(), 2, "1.5 CPUs round up");
        let dir = root.path().join("sys/fs/cgroup/kubepods/pod1").display().to_string();
        assert_eq!(quota.to_string(), format!("cgroup v2 cpu.max 150000 100000 at {dir}"));

        // A parent tighter than the child wins: every ancestor's limit applies.
        std::fs::write(root.path().join("sys/fs/cgroup/kubepods/cpu.max"), "50000 100000").expect("write");
        let quota = find_quota(cgroup, V2_MOUNTINFO, root.path()).expect("a quota");
        assert_eq!((quota.quota_us, quota.cpus()), (50000, 1));
        assert!(quota.dir.ends_with("kubepods"), "{quota:?}");
    }

    #[test]
    fn no_quota_when_every_level_says_max_or_has_no_file() {
        let root = tree(&[("sys/fs/cgroup/a/cpu.max", "max 100000\n"), ("sys/fs/cgroup/a/b/cpu.weight", "100\n")]);
        assert_eq!(find_quota("0::/a/b\n", V2_MOUNTINFO, root.path()), None);
        assert_eq!(find_quota("0::/a/b\n", "", root.path()), None, "no cgroup mount");
        assert_eq!(find_quota("", V2_MOUNTINFO, root.path()), None, "no /proc/self/cgroup");
        let garbage = tree(&[("sys/fs/cgroup/a/cpu.max", "lots\n")]);
        assert_eq!(find_quota("0::/a\n", V2_MOUNTINFO, garbage.path()), None);
    }

    #[test]
    fn v1_reads_the_cpu_hierarchy_and_ignores_unlimited_levels() {
        let base = "sys/fs/cgroup/cpu,cpuacct";
        let root = tree(&[
            (&format!("{base}/cpu.cfs_quota_us"), "-1\n"),
            (&format!("{base}/cpu.cfs_period_us"), "100000\n"),
            (&format!("{base}/docker/cpu.cfs_quota_us"), "250000\n"),
            (&format!("{base}/docker/cpu.cfs_period_us"), "100000\n"),
            (&format!("{base}/docker/abc/cpu.cfs_quota_us"), "-1\n"),
            (&format!("{base}/docker/abc/cpu.cfs_period_us"), "100000\n"),
        ]);
        let cgroup = "12:cpuset:/docker/abc\n11:cpu,cpuacct:/docker/abc\n0::/docker/abc\n";
        let quota = find_quota(cgroup, V1_MOUNTINFO, root.path()).expect("a quota");
        assert_eq!(
            (quota.version, quota.quota_us, quota.period_us, quota.cpus()),
            (CgroupVersion::V1, 250000, 100000, 3)
        );
        assert!(quota.to_string().starts_with("cgroup v1 cpu.cfs_quota_us 250000 cpu.cfs_period_us 100000 at "));
        // A quota without its period is no quota.
        std::fs::remove_file(root.path().join(base).join("docker/cpu.cfs_period_us")).expect("rm");
        assert_eq!(find_quota(cgroup, V1_MOUNTINFO, root.path()), None);
    }

    #[test]
    fn a_container_sees_its_own_cgroup_at_the_mount_point() {
        // Without a cgroup namespace, Docker (v1) mounts the container's cgroup as the root of the
        // hierarchy: mountinfo's root field and /proc/self/cgroup both say /docker/abc.
        let mountinfo = "32 31 0:29 /docker/abc /sys/fs/cgroup/cpu ro - cgroup cgroup rw,cpu\n";
        let root =
            tree(&[("sys/fs/cgroup/cpu/cpu.cfs_quota_us", "50000"), ("sys/fs/cgroup/cpu/cpu.cfs_period_us", "100000")]);
        let quota = find_quota("4:cpu:/docker/abc\n", mountinfo, root.path()).expect("a quota");
        assert_eq!((quota.cpus(), quota.dir.clone()), (1, root.path().join("sys/fs/cgroup/cpu")));
        // A cgroup namespace that hides the process's cgroup ("/.."): the mount's top is read.
        let quota = find_quota("4:cpu:/../other\n", mountinfo, root.path()).expect("a quota");
        assert_eq!(quota.dir, root.path().join("sys/fs/cgroup/cpu"));
    }

    #[test]
    fn the_tightest_of_v1_and_v2_wins_and_cgroup_paths_are_exact() {
        let root = tree(&[
            ("sys/fs/cgroup/cpu,cpuacct/x/cpu.cfs_quota_us", "300000"),
            ("sys/fs/cgroup/cpu,cpuacct/x/cpu.cfs_period_us", "100000"),
            ("sys/fs/cgroup/unified/x/cpu.max", "20000 10000"),
        ]);
        let quota = find_quota("4:cpu,cpuacct:/x\n0::/x\n", V1_MOUNTINFO, root.path()).expect("a quota");
        assert_eq!((quota.version, quota.cpus()), (CgroupVersion::V2, 2));
        assert_eq!(relative_to("/dockerfoo", "/docker"), None);
        assert_eq!(relative_to("/docker/a", "/docker"), Some("a"));
        assert_eq!(relative_to("/a/b", "/"), Some("a/b"));
        assert_eq!(relative_to("/", "/"), Some(""));
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        let mounts = cgroup_mounts(
            "1 2 0:3 / /sys/fs/my\\040cgroup rw - cgroup2 cgroup2 rw\n4 5 6:7 / /x rw - ext4 /dev/a rw\n",
        );
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].mount_point, PathBuf::from("/sys/fs/my cgroup"));
    }

    #[test]
    fn concurrency_is_the_quota_rounded_up_capped_by_the_affinity_mask() {
        let quota = v2(150000, 100000, Path::new("/sys/fs/cgroup/x"));
        let (n, why) = choose(Some(&quota), Some(8), Some(8));
        assert_eq!(
            (n, why.as_str()),
            (Some(2), "--concurrency 2: cgroup v2 cpu.max 150000 100000 at /sys/fs/cgroup/x")
        );
        let (n, why) = choose(Some(&quota), Some(1), Some(8));
        assert_eq!(n, Some(1));
        assert!(why.contains("allows 2 CPUs, the affinity mask only 1"), "{why}");
        assert_eq!(choose(Some(&v2(1000, 100000, Path::new("/"))), None, None).0, Some(1), "at least 1");
        let (n, why) = choose(None, Some(2), Some(4));
        assert_eq!(n, Some(2));
        assert!(why.contains("affinity mask allows 2 of the 4 online CPUs"), "{why}");
        let (n, why) = choose(None, Some(4), Some(4));
        assert_eq!(n, None);
        assert!(why.starts_with("no --concurrency: no CPU quota"), "{why}");
        assert_eq!(choose(None, None, Some(4)).0, None);
    }

    #[test]
    fn cpu_lists_and_settings_parse() {
        assert_eq!(cpu_list_count("0-3,8,10-11\n"), Some(7));
        assert_eq!(cpu_list_count("0\n"), Some(1));
        assert_eq!(cpu_list_count(""), None);
        assert_eq!(cpu_list_count("3-1"), None);
        assert_eq!("auto".parse(), Ok(ConcurrencySetting::Auto));
        assert_eq!("off".parse(), Ok(ConcurrencySetting::Off));
        assert_eq!("4".parse(), Ok(ConcurrencySetting::Fixed(4)));
        assert!("0".parse::<ConcurrencySetting>().is_err());
        assert!("many".parse::<ConcurrencySetting>().is_err());
    }
}
