//! The CLI's side of the control API.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;

use crate::types::ApiError;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the skiff daemon at {addr}: {source}; is `skiff serve` running? Start it \
         (as root) with `skiff serve`, or point at it with --api ADDR"
    )]
    Unreachable {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The daemon answered with an error: its message says what to do.
    #[error("{message}")]
    Api {
        status: StatusCode,
        kind: String,
        message: String,
    },
    #[error("the daemon's answer could not be read: {0}; is {1} a skiff daemon?")]
    Protocol(String, SocketAddr),
    #[error(
        "the daemon at {1} broke off its answer ({0}); it may have been stopped or \
         restarted: run the command again"
    )]
    BrokeOff(String, SocketAddr),
}

pub struct Client {
    addr: SocketAddr,
    token: String,
}

/// Shows where the client talks to, never its token.
impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// A streamed answer: one JSON value per line.
#[derive(Debug)]
pub struct Lines {
    body: Incoming,
    buf: Vec<u8>,
    addr: SocketAddr,
}

impl Lines {
    /// The next value, or `None` at the end of the stream.
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ClientError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return serde_json::from_slice(&line)
                    .map(Some)
                    .map_err(|e| ClientError::Protocol(e.to_string(), self.addr));
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(ClientError::BrokeOff(e.to_string(), self.addr)),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

impl Client {
    pub fn new(addr: SocketAddr, token: String) -> Self {
        Self { addr, token }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        let unreachable = |source| ClientError::Unreachable {
            addr: self.addr,
            source,
        };
        let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(self.addr))
            .await
            .map_err(|_| unreachable(std::io::ErrorKind::TimedOut.into()))?
            .map_err(unreachable)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Protocol(e.to_string(), self.addr))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.addr.to_string())
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .body(Full::new(body))
            .map_err(|e| ClientError::Protocol(e.to_string(), self.addr))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Protocol(e.to_string(), self.addr))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Err(match serde_json::from_slice::<ApiError>(&bytes) {
            Ok(e) => ClientError::Api {
                status,
                kind: e.kind,
                message: e.error,
            },
            Err(_) => ClientError::Api {
                status,
                kind: "http".into(),
                message: format!(
                    "the daemon answered {status}: {}",
                    String::from_utf8_lossy(&bytes)
                ),
            },
        })
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
    ) -> Result<T, ClientError> {
        let resp = self.send(method, path, Bytes::new()).await?;
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string(), self.addr))?
            .to_bytes();
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string(), self.addr))
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.json(Method::GET, path).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.json(Method::DELETE, path).await
    }

    pub async fn post<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.json(Method::POST, path).await
    }

    /// A request whose answer is a stream of JSON lines.
    pub async fn stream(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<Lines, ClientError> {
        let resp = self.send(method, path, body).await?;
        Ok(Lines {
            body: resp.into_body(),
            buf: Vec::new(),
            addr: self.addr,
        })
    }
}

/// `key=value&…` with each value escaped, for a query string.
pub fn query<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}
