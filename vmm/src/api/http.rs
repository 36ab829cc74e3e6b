//! A small HTTP/1.1 server on a Unix socket, parsing with `httparse`.
//!
//! Built for a host-side API that must never be stopped by what a client
//! sends: bounded header size, bounded bodies, read/write timeouts, a cap
//! on concurrent connections, and one thread per connection so a slow
//! client holds up nobody else.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest request body (the API takes none; small ones are read and
/// ignored).
pub const MAX_BODY: usize = 4 * 1024;
/// Connections served at once; more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 64;
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_HEADERS: usize = 64;

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
}

/// A response to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(status: u16, value: &serde_json::Value) -> Self {
        let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
        body.push(b'\n');
        Self {
            status,
            content_type: "application/json",
            body,
        }
    }

    pub fn error(status: u16, message: &str) -> Self {
        Self::json(status, &serde_json::json!({ "error": message }))
    }

    pub fn text(status: u16, content_type: &'static str, body: String) -> Self {
        Self {
            status,
            content_type,
            body: body.into_bytes(),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

pub type Handler = dyn Fn(&Request) -> Response + Send + Sync;

/// Why reading a request ended without one.
enum ReadOutcome {
    Request(Request, bool),
    /// Answer this and close.
    Reject(Response),
    /// The client went away or stayed silent: just close.
    Closed,
}

fn read_request(stream: &mut UnixStream, buf: &mut Vec<u8>) -> ReadOutcome {
    let mut chunk = [0u8; 2048];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let method = parsed.method.unwrap_or_default().to_string();
                let path = parsed.path.unwrap_or_default().to_string();
                let http10 = parsed.version == Some(0);
                let header = |name: &str| {
                    parsed
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
                };
                let close = match header("connection").as_deref() {
                    Some("close") => true,
                    Some("keep-alive") => false,
                    _ => http10,
                };
                if header("transfer-encoding").is_some() {
                    return ReadOutcome::Reject(Response::error(
                        400,
                        "chunked request bodies are not accepted",
                    ));
                }
                let body_len = match header("content-length").map(|v| v.parse::<usize>()) {
                    None => 0,
                    Some(Ok(n)) if n <= MAX_BODY => n,
                    Some(Ok(_)) => {
                        return ReadOutcome::Reject(Response::error(413, "request body too large"))
                    }
                    Some(Err(_)) => {
                        return ReadOutcome::Reject(Response::error(400, "bad Content-Length"))
                    }
                };
                // Read (and drop) the body so that the next request starts
                // where it should.
                while buf.len() < head_len + body_len {
                    match stream.read(&mut chunk) {
                        Ok(0) | Err(_) => return ReadOutcome::Closed,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                buf.drain(..head_len + body_len);
                return ReadOutcome::Request(Request { method, path }, close);
            }
            Ok(httparse::Status::Partial) => {
                if buf.len() >= MAX_HEAD {
                    return ReadOutcome::Reject(Response::error(431, "request head too large"));
                }
            }
            Err(e) => {
                return ReadOutcome::Reject(Response::error(
                    400,
                    &format!("malformed request: {e}"),
                ))
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) => return ReadOutcome::Closed,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => return ReadOutcome::Closed,
        }
    }
}

fn write_response(stream: &mut UnixStream, response: &Response, close: bool) -> bool {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len(),
        if close { "close" } else { "keep-alive" }
    );
    stream.write_all(head.as_bytes()).is_ok() && stream.write_all(&response.body).is_ok()
}

/// Closing with unread input makes the kernel reset the connection, which
/// can destroy the answer just written: stop writing, then drain (bounded)
/// what the client still sends.
fn linger(stream: &mut UnixStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    while drained < (1 << 20) {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}

fn serve_connection(mut stream: UnixStream, handler: &Handler) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let mut buf = Vec::new();
    loop {
        match read_request(&mut stream, &mut buf) {
            ReadOutcome::Request(request, close) => {
                let response = handler(&request);
                if !write_response(&mut stream, &response, close) || close {
                    return;
                }
            }
            ReadOutcome::Reject(response) => {
                write_response(&mut stream, &response, true);
                linger(&mut stream);
                return;
            }
            ReadOutcome::Closed => return,
        }
    }
}

/// A running server; stops (and joins its accept thread) on drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    accept_thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Serves `listener` until dropped.
    pub fn start(listener: UnixListener, handler: Arc<Handler>) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let active = Arc::new(AtomicUsize::new(0));
        let stop_flag = stop.clone();
        let accept_thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || accept_loop(listener, handler, stop_flag, active))?;
        Ok(Self {
            stop,
            accept_thread: Some(accept_thread),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits for `fd` to be readable for at most `ms` milliseconds.
fn poll_readable(fd: i32, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, its count, and a timeout.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}

fn accept_loop(
    listener: UnixListener,
    handler: Arc<Handler>,
    stop: Arc<AtomicBool>,
    active: Arc<AtomicUsize>,
) {
    while !stop.load(Ordering::SeqCst) {
        if !poll_readable(listener.as_raw_fd(), 100) {
            continue;
        }
        let Ok((mut stream, _)) = listener.accept() else {
            continue;
        };
        if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            write_response(
                &mut stream,
                &Response::error(503, "too many connections"),
                true,
            );
            continue;
        }
        active.fetch_add(1, Ordering::SeqCst);
        let (handler, done) = (handler.clone(), active.clone());
        let spawned = std::thread::Builder::new()
            .name("api-conn".into())
            .spawn(move || {
                serve_connection(stream, &*handler);
                done.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(raw: &[u8]) -> String {
        let (mut client, server) = UnixStream::pair().unwrap();
        let handler =
            |r: &Request| Response::text(200, "text/plain", format!("{} {}", r.method, r.path));
        let t = std::thread::spawn(move || serve_connection(server, &handler));
        client.write_all(raw).unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        client.read_to_string(&mut out).unwrap();
        t.join().unwrap();
        out
    }

    #[test]
    fn requests_are_answered_and_kept_alive() {
        let out = exchange(b"GET /a HTTP/1.1\r\n\r\nPUT /b HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        assert!(out.contains("GET /a") && out.contains("PUT /b"), "{out}");
    }

    #[test]
    fn garbage_huge_heads_and_bodies_are_refused() {
        assert!(exchange(b"\x00\x01\x02garbage\r\n\r\n").starts_with("HTTP/1.1 400"));
        let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_HEAD + 10));
        assert!(exchange(&huge).starts_with("HTTP/1.1 431"));
        let big_body = format!("PUT / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1);
        assert!(exchange(big_body.as_bytes()).starts_with("HTTP/1.1 413"));
        // A half-sent request is simply dropped.
        assert_eq!(exchange(b"GET / HTT"), "");
    }
}
