//! An idle launcher's memory. Start-up (argument parsing, the bootstrap, the runtime, TLS for the
//! control API) faults in most of the binary's code, and the kernel maps each page with up to 64 KiB
//! of its neighbours; none of it runs again while Envoy serves and nothing happens. Once an epoch
//! is LIVE, the read-only file mappings are dropped from the launcher's page tables (their pages
//! stay in the page cache, shared, and come back from the file when next touched) and free heap
//! memory goes back to the kernel; so again a second after each control request. Idle VmRSS is
//! then mostly what the launcher really holds.

use std::ffi::c_void;
use std::time::Duration;

use tokio::sync::Notify;

/// Quiet time after the last activity before the pages are given back.
const QUIET: Duration = Duration::from_secs(1);

static ACTIVITY: Notify = Notify::const_new();

/// Something ran that a resting launcher does not (an epoch came up, a control request was
/// answered: a health probe every few seconds touches 2 MiB of code and grows the heap by half a
/// MiB): the pages go back once the launcher has been quiet for a second.
pub fn after_activity() {
    ACTIVITY.notify_one();
}

/// Gives the pages back a second after each burst of activity; sleeps, without a timer, between.
pub async fn give_back_when_quiet() {
    loop {
        ACTIVITY.notified().await;
        while tokio::time::timeout(QUIET, ACTIVITY.notified()).await.is_ok() {}
        give_back_idle_pages();
    }
}

/// Wakes `give_back_when_quiet` when dropped: held by whatever serves a control connection.
pub struct Activity;

impl Drop for Activity {
    fn drop(&mut self) {
        after_activity();
    }
}

/// Fixed thresholds for glibc's heap, set first thing: blocks of 128 KiB and more are mapped on
/// their own (and unmapped when freed), and a heap's free top beyond 128 KiB goes back as it is
/// freed. By default glibc raises both after the first large block is freed (up to 32 and 64 MiB),
/// and a heap other than the main one is never trimmed at its top by `malloc_trim`: the planning
/// thread's heap (below) kept 5 MiB resident after reading a bootstrap of 500 listeners.
pub fn fix_heap_thresholds() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024);
    }
}

/// The free heap goes back to the kernel (glibc merges its lists of small free blocks first).
fn give_back_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory of the heap to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Runs `work` on a thread of its own, and keeps a copy of what it returns made here. glibc gives
/// that thread a heap (arena) of its own, so that the peak of reading a large bootstrap (a
/// megabyte of YAML is tens of MiB of parsed values, freed at once) happens there: in the
/// launcher's heap, what it keeps for good would be scattered over the small free blocks of that
/// peak, each keeping its page resident (at a thousand pairs, twice the memory it holds). Once the
/// copy is made, the thread drops the original itself and gives its heap back; that heap then holds
/// nothing. Runs `work` here if no thread can be started.
pub fn apart<T: Clone + Send, E: Send>(work: impl FnOnce() -> Result<T, E> + Send) -> Result<T, E> {
    use std::sync::{Mutex, MutexGuard, mpsc};
    fn lock<X>(m: &Mutex<X>) -> MutexGuard<'_, X> {
        m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
    let work = Mutex::new(Some(work));
    let made: Mutex<Option<Result<T, E>>> = Mutex::new(None);
    let (ready, made_it) = mpsc::channel::<()>();
    let (copied, told) = mpsc::channel::<()>();
    let (work_ref, made_ref) = (&work, &made);
    let kept = std::thread::scope(|scope| {
        let run = move || {
            let Some(work) = lock(work_ref).take() else { return };
            *lock(made_ref) = Some(work());
            let _ = ready.send(());
            // The original is freed here once it is copied, into this thread's heap, which is
            // then given back whole (freed from the main thread, part of it stayed resident).
            let _ = told.recv();
            drop(lock(made_ref).take());
            give_back_this_threads_heap();
        };
        let thread = std::thread::Builder::new().name("plan".into()).spawn_scoped(scope, run).ok()?;
        let kept = match made_it.recv() {
            Ok(()) => {
                let mut made = lock(&made);
                match made.as_ref() {
                    Some(Ok(value)) => Some(Ok(value.clone())),
                    _ => made.take(),
                }
            }
            Err(_) => None,
        };
        crate::certs::known::move_here();
        let _ = copied.send(());
        if let Err(panic) = thread.join() {
            std::panic::resume_unwind(panic);
        }
        kept
    });
    let kept = match kept {
        Some(kept) => kept,
        // No thread could be started: the work runs here.
        None => match lock(&work).take() {
            Some(work) => work(),
            None => unreachable!("the work ran, or is still here"),
        },
    };
    give_back_free_heap();
    kept
}

/// `malloc_trim` merges a thread heap's free blocks into its top but leaves that top resident (only
/// the main heap's top is trimmed by it); freeing a block that borders the top trims it.
fn give_back_this_threads_heap() {
    give_back_free_heap();
    drop(std::hint::black_box(vec![0u8; 96 * 1024]));
}

/// Gives back the pages of code and constants that start-up touched, and the free heap.
fn give_back_idle_pages() {
    give_back_free_heap();
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else { return };
    for (start, end) in unwritten_code(&smaps) {
        // SAFETY: madvise(MADV_DONTNEED) on a private file mapping whose pages were never written
        // (no anonymous copy) only removes our page table entries: each page is read again from
        // the file when touched.
        unsafe {
            libc::madvise(start as *mut c_void, end - start, libc::MADV_DONTNEED);
        }
    }
}

/// The read-only file mappings (code `r-xp`, constants `r--p`, of a path) none of whose pages was
/// copied on write (relocations that were then made read-only, RELRO, or a text relocation, would
/// have): only those can be dropped without losing anything.
fn unwritten_code(smaps: &str) -> Vec<(usize, usize)> {
    let mut found = Vec::new();
    let mut mapping: Option<(usize, usize)> = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) = (usize::from_str_radix(start, 16), usize::from_str_radix(end, 16))
        {
            let perms = fields.next();
            let path = fields.nth(3);
            let read_only = matches!(perms, Some("r-xp" | "r--p"));
            let code = read_only && path.is_some_and(|p| p.starts_with('/'));
            mapping = code.then_some((start, end));
        } else if first == "Anonymous:"
            && let Some(range) = mapping.take()
            && fields.next() == Some("0")
        {
            found.push(range);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apart_runs_on_a_thread_of_its_own_and_hands_back_a_copy() {
        let here = std::thread::current().id();
        let (ran_on, value) =
            apart(|| Ok::<_, String>((std::thread::current().id(), vec!["kept".to_string()]))).expect("no error");
        assert_ne!(ran_on, here, "the work ran on another thread");
        assert_eq!(value, vec!["kept".to_string()]);
        assert_eq!(apart(|| Err::<(), _>("refused".to_string())), Err("refused".to_string()), "an error is passed on");
    }

    #[test]
    fn only_unwritten_code_of_a_file() {
        let smaps = "\
5555000-5556000 r--p 00000000 08:01 12 /usr/bin/sesame
Rss:                   4 kB
Anonymous:             0 kB
5555800-5555900 r--p 00000000 08:01 12 /usr/bin/sesame
Anonymous:             4 kB
5556000-5558000 r-xp 00001000 08:01 12 /usr/bin/sesame
Anonymous:             0 kB
7f00000-7f01000 r-xp 00000000 08:01 13 /usr/lib/libtextrel.so
Anonymous:             4 kB
7ff0000-7ff1000 r-xp 00000000 00:00 0 [vdso]
Anonymous:             0 kB
7ff2000-7ff3000 rw-p 00000000 00:00 0
Anonymous:             4 kB
";
        assert_eq!(unwritten_code(smaps), vec![(0x5555000, 0x5556000), (0x5556000, 0x5558000)]);
    }
}
