//! `--cert-reload in-place` in the supervisor: a change of only the secrets' files is an attempt
//! (no validator, no epoch), never beside a reload; anything else is a hot restart whose epoch runs
//! on the rewritten bootstrap. The admin is unreachable here, so Envoy never confirms: each written
//! secret ends unconfirmed, after the confirmation's timeout.

use super::*;
use crate::bootstrap::Bootstrap;
use crate::launch::InPlace;
use crate::sds::SdsFiles;

fn pair(serial: u64) -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    params.serial_number = Some(rcgen::SerialNumber::from(serial));
    (params.self_signed(&key).expect("sign").pem(), key.serialize_pem())
}

fn is_rotated(event: &Event) -> bool {
    matches!(event, Event::Rotated { .. })
}

impl Harness {
    /// Epoch 0 LIVE, on a bootstrap with one certificate (serial 1) given by SDS, in place.
    fn serving_in_place() -> Harness {
        Self::serving_with_secrets(true)
    }

    /// The same; with `in_place` false, hot restarts only, the secrets inline.
    fn serving_with_secrets(in_place: bool) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut launch = launch(dir.path(), true);
        let (cert, key) = pair(1);
        std::fs::write(dir.path().join("c.pem"), cert).expect("cert");
        std::fs::write(dir.path().join("k.pem"), key).expect("key");
        let yaml = format!(
            "static_resources:\n  listeners:\n  - filter_chains:\n    - transport_socket:\n        typed_config:\n          \
             common_tls_context:\n            tls_certificates:\n            - certificate_chain: {{ filename: {0}/c.pem \
             }}\n              private_key: {{ filename: {0}/k.pem }}\n",
            dir.path().display()
        );
        std::fs::write(dir.path().join("envoy.yaml"), yaml).expect("bootstrap");
        let files = SdsFiles {
            dir: dir.path().join("sds"),
            bootstrap: dir.path().join("envoy-sds-bootstrap.json"),
            inline: !in_place,
        };
        std::fs::create_dir(&files.dir).expect("sds dir");
        let bootstrap = Bootstrap::from_command(&launch.command).expect("read").expect("a bootstrap");
        let first = files.prepare(&bootstrap, &launch.command).expect("the first pair passes");
        files.write(&first, None).expect("write");
        if let Some(envoy) = launch.envoy.as_mut() {
            envoy.sds = Some(InPlace { files, first: Some(first), rotate_in_place: in_place, active: true });
        }
        let world = Fake::default();
        let (tx, events) = mpsc::unbounded_channel();
        let metrics = Arc::new(Metrics::new());
        let sup = Supervisor::start(launch, settings(dir.path()), world.clone(), tx, metrics, Notifier::from_env())
            .unwrap_or_else(|code| panic!("start failed with {code}"));
        let mut h = Harness { sup, events, world, dir };
        assert_eq!(h.live(0), None);
        h
    }

    fn rotate_to(&self, serial: u64) {
        let (cert, key) = pair(serial);
        std::fs::write(self.dir.path().join("k.pem"), key).expect("key");
        std::fs::write(self.dir.path().join("c.pem"), cert).expect("cert");
    }

    fn served_serial(&self) -> Option<String> {
        self.sup.status().certificates.and_then(|c| c.first().and_then(|c| c.serial.clone()))
    }

    fn attempt_running(&self) -> bool {
        self.sup.in_place.as_ref().is_some_and(|i| i.attempt_running())
    }
}

#[tokio::test(start_paused = true)]
async fn a_certificate_change_is_swapped_with_no_validator_and_a_swap_envoy_does_not_confirm_is_hot_restarted() {
    let mut h = Harness::serving_in_place();
    assert_eq!(h.served_serial().as_deref(), Some("01"));
    h.rotate_to(2);
    h.sup.handle(Event::FilesChanging(crate::watch::Touched::Everything));
    let paths = vec![h.dir.path().join("c.pem"), h.dir.path().join("k.pem")];
    h.sup.handle(Event::FilesChanged(paths));
    assert_eq!(h.sup.status().reload, None, "no reload for certificates in place");
    h.until("the attempt's end", is_rotated).await;
    assert_eq!(h.world.spawned().len(), 1, "only epoch 0, and no validator: {:?}", h.world.spawned());
    assert_eq!(h.served_serial().as_deref(), Some("02"), "the new pair was written");
    let status = h.sup.status();
    let certificate = &status.certificates.as_ref().expect("certificates")[0];
    assert_eq!(certificate.rotated, "in-place");
    assert!(certificate.envoy.contains("did not move"), "no admin here, so not confirmed: {}", certificate.envoy);
    assert_eq!(h.sup.metrics.rotations.get_or_create(&rotation("unconfirmed")).get(), 1);
    // Not confirmed (a deleted directory takes Envoy's watch with it): a new epoch reads it instead.
    assert_eq!(status.reload, Some("checking certificates"), "a hot restart follows");
    let epoch = h.validated().await;
    assert!(
        h.world
            .spawned()
            .iter()
            .any(|(pid, argv)| *pid == epoch && argv.iter().any(|a| a.ends_with("envoy-sds-bootstrap.json")))
    );
}

fn rotation(result: &str) -> crate::metrics::RotationLabel {
    crate::metrics::RotationLabel { mode: "in_place".into(), result: result.into() }
}

#[tokio::test(start_paused = true)]
async fn a_pair_that_fails_waits_while_the_files_settle_and_is_refused_when_they_have() {
    let mut h = Harness::serving_in_place();
    let (_, other_key) = pair(3);
    std::fs::write(h.dir.path().join("k.pem"), other_key).expect("key");
    h.sup.handle(Event::FilesChanging(crate::watch::Touched::Everything));
    h.until("the attempt's end", is_rotated).await;
    assert_eq!(h.sup.metrics.rotations.get_or_create(&rotation("refused")).get(), 0, "waiting, not refused");
    h.sup.handle(Event::FilesChanged(vec![h.dir.path().join("k.pem")]));
    h.until("the settled attempt", is_rotated).await;
    assert_eq!(h.sup.metrics.rotations.get_or_create(&rotation("refused")).get(), 1);
    let status = h.sup.status();
    let refused = status.certificates.as_ref().and_then(|c| c[0].refused.clone()).expect("refused");
    assert!(refused.detail.contains("does not match"), "{}", refused.detail);
    assert_eq!(h.served_serial().as_deref(), Some("01"), "Envoy keeps what it has");
}

#[tokio::test(start_paused = true)]
async fn no_attempt_runs_beside_a_reload_and_the_one_wanted_runs_after_it() {
    let mut h = Harness::serving_in_place();
    h.signal(libc::SIGHUP);
    h.until("the preflight", is_preflight).await;
    h.rotate_to(4);
    h.sup.handle(Event::FilesChanging(crate::watch::Touched::Everything));
    h.until("the quiet wait's end", |e| matches!(e, Event::Deadline(_))).await;
    assert!(!h.attempt_running(), "no attempt while the reload checks");
    let validator = h.world.last_with("validate");
    h.exit(validator, Exit::Code(0));
    h.until("the verdict", is_verdict).await;
    // The files changed since the reload read them: it reads them again, and its epoch gets them.
    h.until("the preflight again", is_preflight).await;
    let validator = h.world.last_with("validate");
    h.exit(validator, Exit::Code(0));
    h.until("the second verdict", is_verdict).await;
    let argv = h.world.spawned().last().map(|(_, argv)| argv.join(" ")).unwrap_or_default();
    assert!(argv.contains("envoy-sds-bootstrap.json"), "the new epoch runs on the rewritten bootstrap: {argv}");
    assert_eq!(h.served_serial().as_deref(), Some("04"), "written for the new epoch");
    assert!(!h.attempt_running(), "still none while the new epoch starts");
    h.live(1);
    h.until("the deferred attempt", is_rotated).await;
    let status = h.sup.status();
    let certificate = &status.certificates.as_ref().expect("certificates")[0];
    assert_eq!((certificate.serial.as_deref(), certificate.rotated), (Some("04"), "hot-restart"));
    assert_eq!(h.sup.metrics.rotations.get_or_create(&rotation("unconfirmed")).get(), 0, "nothing left to swap");
}

#[tokio::test(start_paused = true)]
async fn a_bootstrap_change_is_a_hot_restart_in_place_too() {
    let mut h = Harness::serving_in_place();
    let bootstrap = h.dir.path().join("envoy.yaml");
    h.sup.handle(Event::FilesChanged(vec![bootstrap]));
    assert_eq!(h.sup.status().reload, Some("checking certificates"), "a reload checks for itself");
}

#[tokio::test(start_paused = true)]
async fn a_certificate_the_bootstrap_no_longer_names_is_no_longer_reported() {
    let mut h = Harness::serving_in_place();
    let old = h.dir.path().join("c.pem");
    let text = h.sup.metrics.render();
    assert!(text.contains(&format!("path=\"{}\"", old.display())), "{text}");
    let (cert, key) = pair(5);
    std::fs::write(h.dir.path().join("c2.pem"), cert).expect("cert");
    std::fs::write(h.dir.path().join("k2.pem"), key).expect("key");
    let bootstrap = h.dir.path().join("envoy.yaml");
    let yaml = std::fs::read_to_string(&bootstrap)
        .expect("bootstrap")
        .replace("/c.pem", "/c2.pem")
        .replace("/k.pem", "/k2.pem");
    std::fs::write(&bootstrap, yaml).expect("bootstrap");
    h.sup.handle(Event::FilesChanged(vec![bootstrap]));
    h.validated().await;
    let text = h.sup.metrics.render();
    assert!(!text.contains(&format!("path=\"{}\"", old.display())), "{text}");
    assert!(text.contains(&format!("path=\"{}\"", h.dir.path().join("c2.pem").display())), "{text}");
}

#[tokio::test(start_paused = true)]
async fn by_hot_restart_the_new_certificate_is_reported_once_its_epoch_serves() {
    let mut h = Harness::serving_with_secrets(false);
    h.rotate_to(6);
    h.signal(libc::SIGHUP);
    h.validated().await;
    assert_eq!(h.served_serial().as_deref(), Some("01"), "epoch 0 serves the old one until epoch 1 is LIVE");
    h.live(1);
    assert_eq!(h.served_serial().as_deref(), Some("06"));
    let status = h.sup.status();
    assert_eq!(status.certificates.as_ref().expect("certificates")[0].rotated, "hot-restart");
    // A reload whose epoch fails leaves what the serving one has.
    h.rotate_to(7);
    h.signal(libc::SIGHUP);
    h.validator_passes().await;
    // Epoch 0 drains and exits; epoch 2 starts once the files stayed as checked, and fails.
    let draining = h.pid_of(0);
    h.exit(draining, Exit::Code(0));
    h.until_state("epoch 2 to start", |sup| matches!(sup.reload.step(), Some(Step::Starting { .. }))).await;
    let Some(Step::Starting { pid, .. }) = h.sup.reload.step() else { panic!("not starting") };
    let pid = *pid;
    h.exit(pid, Exit::Code(1));
    assert_eq!(h.served_serial().as_deref(), Some("06"), "the failed epoch's certificate was never served");
}

#[tokio::test(start_paused = true)]
async fn an_attempts_outcomes_go_to_the_secrets_they_name_whatever_the_list_is_now() {
    let mut h = Harness::serving_in_place();
    h.rotate_to(2);
    h.sup.handle(Event::FilesChanged(vec![h.dir.path().join("c.pem"), h.dir.path().join("k.pem")]));
    let attempt = h.sup.in_place.as_ref().and_then(|i| i.running_attempt()).expect("an attempt runs");
    // Reported as if a reload had replaced the list meanwhile: a secret it dropped comes first.
    let expired = crate::certs::CertError::Expired { path: "/gone.pem".into(), on: "yesterday".into() };
    let refused = crate::sds::Outcome::Refused(expired);
    h.sup.handle(Event::Rotated { attempt, outcomes: vec![("a-secret-no-longer-named".into(), refused)] });
    assert_eq!(h.served_serial().as_deref(), Some("01"), "nothing applied to the wrong secret");
    let status = h.sup.status();
    assert!(status.certificates.as_ref().expect("certificates")[0].refused.is_none());
}

#[tokio::test(start_paused = true)]
async fn an_attempt_reads_only_the_secrets_whose_files_the_events_named() {
    let mut h = Harness::serving_in_place();
    h.rotate_to(5);
    let neighbour = h.dir.path().join("access.log");
    h.sup.handle(Event::FilesChanging(crate::watch::Touched::Paths(vec![neighbour])));
    h.until("the attempt for the neighbour", is_rotated).await;
    assert_eq!(h.served_serial().as_deref(), Some("01"), "a neighbour's event does not read the pair");
    let named = vec![h.dir.path().join("c.pem")];
    h.sup.handle(Event::FilesChanging(crate::watch::Touched::Paths(named)));
    h.until("the attempt for the certificate", is_rotated).await;
    assert_eq!(h.served_serial().as_deref(), Some("05"), "the pair its event named is read and written");
}
