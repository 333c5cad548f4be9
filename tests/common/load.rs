//! HTTPS load for the tests that promise no failed request: clients sending back to back, half on
//! keep-alive connections and half on a new connection per request, until stopped.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use super::tls::HttpsClient;

/// The load tests take both cores: one at a time, or their timings mean nothing.
pub static ONE_LOAD_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub struct Load {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicUsize>,
    clients: Vec<JoinHandle<(usize, Vec<String>)>>,
}

/// What a load sent, and every failure with its error.
pub struct Outcome {
    pub sent: usize,
    pub failures: Vec<String>,
}

impl Load {
    /// `keep_alive` clients on keep-alive connections and `fresh` with a new connection per request.
    pub fn start(port: u16, keep_alive: usize, fresh: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicUsize::new(0));
        let clients = (0..keep_alive + fresh)
            .map(|i| {
                let (stop, answered) = (stop.clone(), answered.clone());
                std::thread::spawn(move || {
                    super::yield_to_the_system_under_test();
                    let mut client = HttpsClient::new(port, i < keep_alive);
                    let (mut sent, mut failures) = (0, Vec::new());
                    while !stop.load(Ordering::SeqCst) {
                        sent += 1;
                        match client.get() {
                            Ok((200, _)) => {
                                answered.fetch_add(1, Ordering::SeqCst);
                            }
                            Ok((status, _)) => failures.push(format!("status {status}")),
                            Err(e) => failures.push(e),
                        }
                    }
                    (sent, failures)
                })
            })
            .collect();
        Load { stop, answered, clients }
    }

    pub fn answered(&self) -> usize {
        self.answered.load(Ordering::SeqCst)
    }

    /// Waits until every client has been answered a few times, as in production before a change.
    pub fn wait_running(&self) {
        let wanted = self.clients.len() * 5;
        super::wait_for(Duration::from_secs(30), "the load to run", || self.answered() >= wanted);
    }

    pub fn stop(self) -> Outcome {
        self.stop.store(true, Ordering::SeqCst);
        let (mut sent, mut failures) = (0, Vec::new());
        for client in self.clients {
            let (s, f) = client.join().expect("client");
            sent += s;
            failures.extend(f);
        }
        Outcome { sent, failures }
    }
}

impl Outcome {
    /// Fails unless the load ran (`at_least` requests) and none failed; `log` explains a failure.
    pub fn assert_none_failed(&self, at_least: usize, log: &str) {
        assert!(self.sent >= at_least, "the load ran: {} requests", self.sent);
        let shown = &self.failures[..self.failures.len().min(5)];
        assert!(self.failures.is_empty(), "{} of {} requests failed: {shown:?}\n{log}", self.failures.len(), self.sent);
    }
}
