//! The operator's window: Prometheus metrics at `/metrics`, the status page at `/` (with its
//! script at `/status.js` and its data at `/api/status`). Read-only: nothing served here can
//! change what the controller does.
//!
//! A deliberately small HTTP/1.1 server: GET and HEAD only, one request per connection, the
//! request head capped at 8 KiB and 5 s, at most 64 connections at once (more are turned away).
//! Anything else gets a 4xx and the connection closes; nothing a client sends can panic it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::show::metrics::Telemetry;

const MAX_HEAD: usize = 8 * 1024;
const DEADLINE: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: usize = 64;

const PAGE: &str = include_str!("status/index.html");
const SCRIPT: &str = include_str!("status/status.js");

#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics and the status page on {addr}: {source}")]
pub struct HttpError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Binds the endpoint's address (so a port in use is an error at start-up, not later).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, HttpError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError { addr, source })
}

/// Serves until `cancel`.
pub async fn serve(listener: TcpListener, telemetry: Arc<Telemetry>, cancel: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        // Cancel-safe: accept() loses no connection when cancellation wins.
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    warn!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "too many http connections; turned away");
            continue;
        };
        let telemetry = telemetry.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if tokio::time::timeout(DEADLINE, handle(stream, &telemetry))
                .await
                .is_err()
            {
                debug!(%peer, "http client too slow; dropped");
            }
        });
    }
}

async fn handle(mut stream: TcpStream, telemetry: &Telemetry) {
    let response = match read_head(&mut stream).await {
        Ok(head) => respond(&head, telemetry),
        Err(status) => Response::error(status),
    };
    let _ = stream.write_all(&response.bytes()).await;
    let _ = stream.shutdown().await;
}

/// Reads up to the blank line that ends the request head.
async fn read_head(stream: &mut TcpStream) -> Result<String, u16> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|_| 400u16)?;
        if n == 0 {
            return Err(400);
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(end);
            return String::from_utf8(buf).map_err(|_| 400);
        }
        if buf.len() > MAX_HEAD {
            return Err(431);
        }
    }
}

struct Response {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    /// HEAD: the headers only.
    head_only: bool,
}

impl Response {
    fn ok(content_type: &'static str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status: 200,
            content_type,
            body: body.into(),
            head_only: false,
        }
    }

    fn error(status: u16) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: format!("{} {}\n", status, reason(status)).into_bytes(),
            head_only: false,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\
             X-Content-Type-Options: nosniff\r\nContent-Security-Policy: default-src 'self'; \
             style-src 'self' 'unsafe-inline'\r\nConnection: close\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        if self.status == 405 {
            out.push_str("Allow: GET, HEAD\r\n");
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if !self.head_only {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

/// The response to one request head.
fn respond(head: &str, telemetry: &Telemetry) -> Response {
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Response::error(400);
    };
    if !version.starts_with("HTTP/1.") {
        return Response::error(505);
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Response::error(405),
    };
    let path = target.split(['?', '#']).next().unwrap_or_default();
    let mut response = match path {
        "/" | "/index.html" => Response::ok("text/html; charset=utf-8", PAGE),
        "/status.js" => Response::ok("text/javascript; charset=utf-8", SCRIPT),
        "/metrics" => Response::ok(
            "text/plain; version=0.0.4; charset=utf-8",
            telemetry.prometheus(),
        ),
        "/api/status" => match serde_json::to_vec(&telemetry.view()) {
            Ok(json) => Response::ok("application/json", json),
            Err(e) => {
                tracing::error!(error = %e, "cannot serialise the status page's view");
                Response::error(500)
            }
        },
        _ => Response::error(404),
    };
    response.head_only = head_only;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_of(head: &str) -> u16 {
        respond(head, &Telemetry::default()).status
    }

    #[test]
    fn routes_and_methods_table() {
        for (head, status) in [
            ("GET / HTTP/1.1\r\nHost: x", 200),
            ("GET /metrics HTTP/1.1", 200),
            ("GET /metrics?x=1 HTTP/1.0", 200),
            ("HEAD /api/status HTTP/1.1", 200),
            ("GET /status.js HTTP/1.1", 200),
            ("GET /nope HTTP/1.1", 404),
            ("POST /metrics HTTP/1.1", 405),
            ("GET /metrics HTTP/2", 505),
            ("GET /metrics", 400),
            ("GET  /metrics HTTP/1.1", 400),
            ("", 400),
        ] {
            assert_eq!(status_of(head), status, "{head:?}");
        }
    }

    #[test]
    fn head_sends_the_length_but_not_the_body() {
        let mut r = respond("HEAD /metrics HTTP/1.1", &Telemetry::default());
        let head = String::from_utf8(r.bytes()).unwrap();
        assert!(head.ends_with("\r\n\r\n"), "{head}");
        r.head_only = false;
        let len = r.body.len();
        assert!(
            head.contains(&format!("Content-Length: {len}\r\n")),
            "{head}"
        );
    }

    #[test]
    fn the_page_loads_its_script_from_the_same_origin() {
        assert!(PAGE.contains("<script src=\"/status.js\""));
        assert!(
            !PAGE.contains("<script>"),
            "inline scripts are refused by the CSP"
        );
    }
}
