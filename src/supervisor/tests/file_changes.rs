//! The checks that run while the watched files settle: taken over at the debounce's end when they
//! stand for the files as they are then, discarded (their validator killed) otherwise.

use super::*;

impl Harness {
    fn bootstrap(&self) -> std::path::PathBuf {
        self.dir.path().join("envoy.yaml")
    }

    /// The watcher sees a change to a watched file: a debounce begins (or goes on).
    fn files_changing(&mut self) {
        self.sup.handle(Event::FilesChanging(crate::watch::Touched::Everything));
    }

    /// The debounce ends with the bootstrap changed.
    fn files_settled(&mut self) {
        let bootstrap = self.bootstrap();
        self.sup.handle(Event::FilesChanged(vec![bootstrap]));
    }

    async fn early_preflight(&mut self) -> Pid {
        self.until("the early preflight", is_preflight).await;
        self.world.last_with("validate")
    }

    /// The validator exits and its verdict is handled.
    async fn verdict(&mut self, validator: Pid, exit: Exit) {
        self.exit(validator, exit);
        self.until("the verdict", is_verdict).await;
    }

    fn validators(&self) -> usize {
        self.world.spawned().iter().filter(|(_, argv)| argv.iter().any(|a| a == "validate")).count()
    }
}

#[tokio::test(start_paused = true)]
async fn checks_done_before_the_debounce_ends_start_the_new_epoch_at_once() {
    let mut h = Harness::serving();
    h.files_changing();
    let validator = h.early_preflight().await;
    assert_eq!(h.sup.status().reload, None, "nothing is under way for /status while the files settle");
    h.verdict(validator, Exit::Code(0)).await;
    assert_eq!(h.world.spawned().len(), 2, "no epoch before the debounce ends");

    h.files_settled();
    assert_eq!(h.sup.status().reload, Some("starting the new epoch"), "started at once");
    assert_eq!(h.validators(), 1, "validated once");
    h.live(1);
    let status = h.sup.status();
    assert_eq!((status.current_epoch, status.last_reload.map(|r| r.result)), (1, Some(ReloadResult::Success)));
}

#[tokio::test(start_paused = true)]
async fn a_debounce_that_ends_while_the_validator_runs_waits_for_it() {
    let mut h = Harness::serving();
    h.files_changing();
    let validator = h.early_preflight().await;
    h.files_settled();
    assert_eq!(h.sup.status().reload, Some("validating"), "the running validator is taken over");
    h.verdict(validator, Exit::Code(0)).await;
    assert_eq!(h.sup.status().reload, Some("starting the new epoch"));
    assert_eq!(h.validators(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_change_during_the_checks_kills_the_validator_and_checks_again() {
    let mut h = Harness::serving();
    h.files_changing();
    let first = h.early_preflight().await;
    std::fs::write(h.bootstrap(), "static_resources: { listeners: [] }\n").expect("write");
    h.files_changing();
    assert_eq!(h.world.signals(), vec![(first, libc::SIGKILL)], "the stale validator is killed");
    let second = h.early_preflight().await;
    assert_ne!(first, second);
    // The killed one is reaped as our child, and its end is no verdict.
    h.exit(first, Exit::Signal(libc::SIGKILL));
    assert_eq!(h.sup.metrics.render().matches("kind=\"validator\"} 1").count(), 1, "{}", h.sup.metrics.render());
    h.verdict(second, Exit::Code(0)).await;
    // An event that did not change the files leaves passed checks alone.
    h.files_changing();
    assert_eq!(h.validators(), 2);
    h.files_settled();
    assert_eq!(h.sup.status().reload, Some("starting the new epoch"));
    assert_eq!(h.world.signals().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn checks_of_files_that_changed_since_are_not_taken_over() {
    let mut h = Harness::serving();
    h.files_changing();
    let validator = h.early_preflight().await;
    std::fs::write(h.dir.path().join("envoy-validate.log"), "[x][critical][main] error: half a pair\n").expect("log");
    h.verdict(validator, Exit::Code(1)).await;
    // The rest of the pair, written after the checks; its event not handled yet when the debounce ends.
    std::fs::write(h.bootstrap(), "static_resources: { clusters: [] }\n").expect("write");
    h.files_settled();
    assert!(h.sup.status().last_reload.is_none(), "no refusal for files that are no longer there");
    assert_eq!(h.sup.status().reload, Some("checking certificates"), "checked again, from the start");
    h.validator_passes().await;
    assert_eq!(h.validators(), 2);
    assert_eq!(h.sup.status().reload, Some("starting the new epoch"));
}

#[tokio::test(start_paused = true)]
async fn failed_checks_are_a_refusal_at_the_debounces_end() {
    let mut h = Harness::serving();
    h.files_changing();
    let validator = h.early_preflight().await;
    std::fs::write(h.dir.path().join("envoy-validate.log"), "[x][critical][main] error: bad cert\n").expect("log");
    h.verdict(validator, Exit::Code(1)).await;
    assert!(h.sup.status().last_reload.is_none(), "nothing is refused before the debounce ends");
    h.files_settled();
    let status = h.sup.status();
    let last = status.last_reload.expect("a reload");
    assert_eq!(
        (last.result, last.detail.as_str()),
        (ReloadResult::Refused, "envoy --mode validate failed (exit status 1): error: bad cert")
    );
    assert_eq!((status.reload, status.current_epoch), (None, 0));
    assert_eq!(h.world.spawned().len(), 2, "epoch 0 and the validator, no epoch 1");
    assert!(
        h.sup.metrics.render().contains("sesame_reloads_total{result=\"refused\"} 1"),
        "{}",
        h.sup.metrics.render()
    );
}

#[tokio::test(start_paused = true)]
async fn a_bootstrap_that_does_not_parse_is_refused_at_the_debounces_end() {
    let mut h = Harness::serving();
    std::fs::write(h.bootstrap(), "admin: [unclosed\n").expect("break it");
    h.files_changing();
    h.until("the early preflight", is_preflight).await;
    assert_eq!(h.validators(), 0);
    h.files_settled();
    let detail = h.sup.status().last_reload.expect("a reload").detail;
    assert!(detail.contains("cannot parse the bootstrap"), "{detail}");
}

#[tokio::test(start_paused = true)]
async fn a_stop_while_the_checks_run_kills_the_validator_and_starts_nothing() {
    let mut h = Harness::serving();
    h.files_changing();
    let validator = h.early_preflight().await;
    h.signal(libc::SIGTERM);
    assert_eq!(h.world.signals(), vec![(validator, libc::SIGKILL)]);
    h.files_settled();
    h.exit(validator, Exit::Signal(libc::SIGKILL));
    assert_eq!(h.world.spawned().len(), 2, "no epoch 1, no other validator");
    assert_eq!(h.sup.status().reload, None);
    assert!(h.sup.epochs.find(1).is_none());
}

#[tokio::test(start_paused = true)]
async fn a_sighup_while_the_files_settle_checks_for_itself() {
    let mut h = Harness::serving();
    h.files_changing();
    let early = h.early_preflight().await;
    h.signal(libc::SIGHUP);
    assert_eq!(h.world.signals(), vec![(early, libc::SIGKILL)]);
    assert_eq!(h.sup.status().reload, Some("checking certificates"));
    h.validator_passes().await;
    assert_eq!(h.validators(), 2);
}

#[tokio::test(start_paused = true)]
async fn files_that_keep_changing_start_a_few_validators_per_debounce_not_one_per_write() {
    let mut h = Harness::serving();
    for write in 0..10 {
        std::fs::write(h.bootstrap(), format!("static_resources: {{ listeners: [] }}\n# write {write}\n"))
            .expect("write");
        h.files_changing();
        if write < 3 {
            h.early_preflight().await;
        }
        assert_eq!(h.sup.early_checks_started(), (write + 1).min(3), "after write {write}");
    }
    assert_eq!(h.validators(), 3, "three early checks in one debounce, then the reload checks for itself");
    h.files_settled();
    h.until("the reload's own validator", is_preflight).await;
    assert_eq!(h.validators(), 4, "the debounce's end checks the files as they are");
    // The next debounce may check early again.
    h.verdict(h.world.last_with("validate"), Exit::Code(0)).await;
    h.live(1);
    std::fs::write(h.bootstrap(), "static_resources: { clusters: [] }\n").expect("write");
    h.files_changing();
    h.early_preflight().await;
    assert_eq!(h.validators(), 5);
}

#[tokio::test(start_paused = true)]
async fn after_a_refused_reload_files_touched_again_are_checked_again_even_unchanged() {
    let mut h = Harness::serving();
    h.files_changing();
    let validator = h.early_preflight().await;
    std::fs::write(h.dir.path().join("envoy-validate.log"), "[x][critical][main] error: half a pair\n").expect("log");
    h.verdict(validator, Exit::Code(1)).await;
    h.files_settled();
    assert_eq!(h.sup.status().last_reload.map(|r| r.result), Some(ReloadResult::Refused));
    // The watcher saw no change since its last debounce (it hashed the files between two writes
    // that the refused checks straddled): the files are checked again all the same.
    h.files_changing();
    let again = h.early_preflight().await;
    h.verdict(again, Exit::Code(0)).await;
    h.sup.handle(Event::FilesChanged(vec![]));
    assert_eq!(h.sup.status().reload, Some("starting the new epoch"), "the pair that settled is served");
}
