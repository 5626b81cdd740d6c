//! Loopback networking helpers shared by the integration tests.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A TCP port on 127.0.0.1 that was free a moment ago, for a child process
/// to bind.
///
/// All six former copies (delivery, notification, façade, payment's
/// stripe-mock unit test, e2e procs and private_cluster) were the same: bind
/// port 0, read the port, drop the listener; none was more careful, so this
/// is that one. Another process may take the port before the child binds it
/// (the OS hands ephemeral ports out in turn, so that is rare); the child then
/// fails to start and the test fails, it does not talk to a stranger quietly.
/// Panics if loopback cannot be bound (a broken test host).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .unwrap_or_else(|e| panic!("binding a free port on 127.0.0.1: {e}"))
        .port()
}

/// A bare HTTP/1.1 GET on loopback: (status, body), or `None` if the
/// connection or the status line fails (callers poll with it while a server
/// starts). The body is everything after the header block, unparsed (no
/// chunked decoding): the servers probed answer with `Content-Length`.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    parse_response(&String::from_utf8_lossy(&buf))
}

/// (status, body) of a whole HTTP/1.1 response read to its end: the status
/// is the second word, the body everything after the first blank line
/// (empty if there is none). `None` if there is no numeric status.
pub fn parse_response(text: &str) -> Option<(u16, String)> {
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    Some((code, body))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn free_port_is_bindable() {
        let port = free_port();
        assert_ne!(port, 0);
        std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    }

    #[tokio::test]
    async fn http_get_reads_status_and_body() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut req = vec![0u8; 1024];
            let n = s.read(&mut req).await.unwrap();
            s.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 8\r\n\r\nnot yet\n")
                .await
                .unwrap();
            String::from_utf8_lossy(&req[..n]).into_owned()
        });
        let got = http_get(addr, "/readyz").await;
        assert_eq!(got, Some((503, "not yet\n".to_string())));
        assert!(
            server
                .await
                .unwrap()
                .starts_with("GET /readyz HTTP/1.1\r\n")
        );
    }

    #[test]
    fn parse_response_takes_status_and_what_follows_the_headers() {
        assert_eq!(
            parse_response("HTTP/1.1 200 OK\r\nA: b\r\n\r\n{\"x\":1}"),
            Some((200, "{\"x\":1}".to_string()))
        );
        assert_eq!(
            parse_response("HTTP/1.1 204 No Content\r\n"),
            Some((204, String::new()))
        );
        assert_eq!(parse_response("SSH-2.0-OpenSSH_9.6\r\n"), None);
        assert_eq!(parse_response(""), None);
    }

    #[tokio::test]
    async fn http_get_is_none_when_nothing_listens() {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        assert_eq!(http_get(addr, "/").await, None);
    }
}
