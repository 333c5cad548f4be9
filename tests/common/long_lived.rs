//! Connections that must outlive a rotation: an HTTPS keep-alive connection asking every 100 ms,
//! and a TCP stream through a TLS-terminating `tcp_proxy` listener to an echo upstream, pinging
//! every 100 ms. Each runs on one connection from start to end: a cut is an error, never a
//! reconnection.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use super::tls::client_config;

const EVERY: Duration = Duration::from_millis(100);

/// A long-lived connection's thread, and how many round trips it has made.
pub struct LongLived {
    stop: Arc<AtomicBool>,
    trips: Arc<AtomicUsize>,
    thread: JoinHandle<Result<usize, String>>,
}

/// What a long-lived connection did: its round trips, or the error that ended it.
impl LongLived {
    /// One HTTPS connection to `port`, a `GET /` on it every 100 ms.
    pub fn https(port: u16) -> LongLived {
        Self::run(port, |tls| {
            tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").map_err(|e| format!("write: {e}"))?;
            match super::read_response_head(tls)? {
                (200, false) => Ok(()),
                (status, close) => Err(format!("status {status}, close {close}")),
            }
        })
    }

    /// One TLS connection to the `tcp_proxy` listener on `port`, a line echoed every 100 ms.
    pub fn tcp_proxy(port: u16) -> LongLived {
        let mut reader_buffer = Vec::new();
        let mut sent = 0u64;
        Self::run(port, move |tls| {
            sent += 1;
            let line = format!("ping {sent}\n");
            tls.write_all(line.as_bytes()).map_err(|e| format!("write: {e}"))?;
            reader_buffer.clear();
            let mut byte = [0u8; 1];
            while !reader_buffer.ends_with(b"\n") {
                match std::io::Read::read(tls, &mut byte) {
                    Ok(0) => return Err("closed".into()),
                    Ok(_) => reader_buffer.push(byte[0]),
                    Err(e) => return Err(format!("read: {e}")),
                }
            }
            if reader_buffer == line.as_bytes() {
                Ok(())
            } else {
                Err(format!("echoed {:?}", String::from_utf8_lossy(&reader_buffer)))
            }
        })
    }

    fn run(
        port: u16,
        mut trip: impl FnMut(&mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>) -> Result<(), String>
        + Send
        + 'static,
    ) -> LongLived {
        let (stop, trips) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
        let (stop_, trips_) = (stop.clone(), trips.clone());
        let thread = std::thread::spawn(move || {
            let tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
            tcp.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
            tcp.set_nodelay(true).map_err(|e| e.to_string())?;
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
            let conn = rustls::ClientConnection::new(client_config(), name).map_err(|e| e.to_string())?;
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            while !stop_.load(Ordering::SeqCst) {
                let done = trips_.load(Ordering::SeqCst);
                trip(&mut tls).map_err(|e| format!("after {done} round trips: {e}"))?;
                trips_.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(EVERY);
            }
            Ok(trips_.load(Ordering::SeqCst))
        });
        let long_lived = LongLived { stop, trips, thread };
        super::wait_for(Duration::from_secs(10), "the long-lived connection to make a round trip", || {
            long_lived.trips.load(Ordering::SeqCst) > 0 || long_lived.thread.is_finished()
        });
        long_lived
    }

    /// Still going: no error so far.
    pub fn alive(&self) -> bool {
        !self.thread.is_finished()
    }

    /// Stops it; its round trips, or the error that cut it.
    pub fn stop(self) -> Result<usize, String> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("long-lived connection thread")
    }
}

/// An upstream that echoes each line it reads, on every connection, until the test ends.
pub fn echo_upstream() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind echo");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let Ok(mut writer) = stream.try_clone() else { return };
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { return };
                    if writer.write_all(format!("{line}\n").as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}
