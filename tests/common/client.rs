//! HTTP/1.1 clients for the tests: plain and TLS requests to Envoy's listeners, its admin API over
//! its unix socket, and the launcher's control API; every read is bounded.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// GET / over plain HTTP/1.1; returns the status code, or None when the request fails.
pub fn http_get(port: u16) -> Option<u16> {
    request(port, "/").ok()
}

/// GET / over HTTPS, trusting only the certificate in `ca_pem`.
pub fn https_get(port: u16, ca_pem: &Path) -> Option<u16> {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_pem).ok()? {
        roots.add(cert.ok()?).ok()?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from("localhost").ok()?;
    let conn = rustls::ClientConnection::new(Arc::new(config), name).ok()?;
    let tcp = TcpStream::connect(("127.0.0.1", port)).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
    read_response(&mut tls).ok()
}

/// One request over a fresh connection, read as a client does (headers, then content-length bytes,
/// then the client closes); the status, or the error that ended it.
pub fn request(port: u16, path: &str) -> Result<u16, String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(|e| format!("write: {e}"))?;
    read_response(&mut stream)
}

/// Reads one HTTP/1.1 response with a content-length body; returns its status.
pub fn read_response(stream: &mut impl Read) -> Result<u16, String> {
    read_response_head(stream).map(|(status, _)| status)
}

/// Reads one HTTP/1.1 response with a content-length body; returns its status and whether the
/// server asked to close the connection.
pub fn read_response_head(stream: &mut impl Read) -> Result<(u16, bool), String> {
    read_full_response(stream).map(|(status, close, _)| (status, close))
}

/// Reads one HTTP/1.1 response with a content-length body: status, whether the server asked to
/// close the connection, and the body.
pub fn read_full_response(stream: &mut impl Read) -> Result<(u16, bool, String), String> {
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&response[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if response.len() >= end + 4 + length {
                let status = head.strip_prefix("http/1.1 ").and_then(|r| r.get(..3)?.parse().ok());
                let close = head.lines().any(|l| l.replace(' ', "") == "connection:close");
                let body = String::from_utf8_lossy(&response[end + 4..end + 4 + length]).into_owned();
                return status.map(|s| (s, close, body)).ok_or_else(|| format!("bad status line in {head:?}"));
            }
        }
        match stream.read(&mut buf) {
            Ok(0) => return Err(format!("connection closed after {} bytes", response.len())),
            Ok(n) => response.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

/// A GET to Envoy's admin API over its unix socket: the status, or None when it does not answer.
pub fn admin_get(socket: &Path, path: &str) -> Option<u16> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").ok()?;
    read_response(&mut stream).ok()
}

/// A client connection that made one request and now sits idle on keep-alive.
pub fn idle_keepalive_connection(port: u16) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    stream.write_all(b"GET /direct HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("write");
    let mut buf = [0u8; 1024];
    let n = stream.read(&mut buf).expect("read");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "keep-alive request answered");
    stream
}

/// One HTTP/1.1 exchange on `stream`: the status and body (content-length framed).
pub fn call(
    stream: &mut (impl Read + Write),
    method: &str,
    path: &str,
    headers: &[&str],
) -> Result<(u16, String), String> {
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 0\r\n");
    for header in headers {
        request += &format!("{header}\r\n");
    }
    request += "\r\n";
    stream.write_all(request.as_bytes()).map_err(|e| format!("write: {e}"))?;
    read_full_response(stream).map(|(status, _, body)| (status, body))
}

/// A request to the launcher's control socket.
pub fn control(socket: &Path, method: &str, path: &str) -> Result<(u16, String), String> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
    call(&mut stream, method, path, &[])
}

/// A request to the control API over TCP.
pub fn control_tcp(port: u16, method: &str, path: &str, headers: &[&str]) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
    call(&mut stream, method, path, headers)
}

/// A POST to Envoy's admin API over its unix socket: the status, or None when it does not answer.
pub fn admin_post(socket: &Path, path: &str) -> Option<u16> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "POST {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").ok()?;
    read_response(&mut stream).ok()
}

/// A GET to Envoy's admin API over its unix socket: the body of a 200 answer, read to the end of
/// the connection (Envoy may send it chunked; the chunk sizes are left in, harmless for a search).
pub fn admin_body(socket: &Path, path: &str) -> Option<String> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// A GET on `stream` read to the end of the connection, as a scraper reads it: the status, the head
/// (lower case) and the body, de-chunked when it came chunked.
pub fn get_to_close(stream: &mut (impl Read + Write), path: &str) -> Result<(u16, String, String), String> {
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(|e| format!("read: {e}"))?;
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or("no complete response head")?;
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let status = head.get(9..12).and_then(|s| s.parse().ok()).ok_or_else(|| format!("bad status line: {head}"))?;
    let mut body = raw[end + 4..].to_vec();
    if head.lines().any(|l| l.replace(' ', "") == "transfer-encoding:chunked") {
        body = dechunk(&body).ok_or_else(|| format!("a chunked body cut short ({} bytes)", body.len()))?;
    }
    Ok((status, head, String::from_utf8_lossy(&body).into_owned()))
}

/// The data of a chunked body; None when it does not end with the last (empty) chunk.
fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut data = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..line_end]).ok()?.trim(), 16).ok()?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Some(data);
        }
        data.extend_from_slice(raw.get(..size)?);
        raw = raw.get(size + 2..)?;
    }
}
