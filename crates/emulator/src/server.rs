//! Serving a router on a listener, with one thing axum's own `serve` cannot do: close a
//! connection without writing an answer.
//!
//! A handler marks its response with [`DropConnection`]; the service wrapper here turns that
//! response into an error, and hyper answers a service error by closing the connection without
//! writing anything — the client sees a connection error, not a status.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tower::ServiceExt;

/// Response extension: "close the connection instead of answering".
#[derive(Debug, Clone, Copy)]
pub struct DropConnection;

/// A response that is never written: the connection is closed instead.
pub fn drop_connection() -> Response {
    let mut response = Response::new(Body::empty());
    response.extensions_mut().insert(DropConnection);
    response
}

/// The error hyper receives for a [`DropConnection`] response.
#[derive(Debug)]
struct ConnectionDroppedOnPurpose;

impl std::fmt::Display for ConnectionDroppedOnPurpose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by fault injection")
    }
}

impl std::error::Error for ConnectionDroppedOnPurpose {}

/// How long in-flight answers may take to finish after shutdown was asked for.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// A running accept loop; dropping it stops the server and aborts every connection.
pub struct RunningServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl RunningServer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets in-flight answers finish (at most a second), then closes everything.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort(); // the task owns the connections' JoinSet, which aborts them in turn
        }
    }
}

pub fn spawn(listener: TcpListener, router: Router) -> std::io::Result<RunningServer> {
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = oneshot::channel();
    let task = tokio::spawn(accept_loop(listener, router, stop_rx));
    Ok(RunningServer {
        addr,
        stop: Some(stop_tx),
        task: Some(task),
    })
}

async fn accept_loop(listener: TcpListener, router: Router, mut stop: oneshot::Receiver<()>) {
    let builder = auto::Builder::new(TokioExecutor::new());
    let mut connections = JoinSet::new();
    let (closing_tx, closing_rx) = watch::channel(false);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _peer)) => stream,
                    Err(error) => {
                        // Typically out of file descriptors: back off instead of spinning.
                        eprintln!("emulator: accept failed: {error}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let router = router.clone();
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let router = router.clone();
                    async move {
                        let response = match router.oneshot(request).await {
                            Ok(response) => response,
                            Err(never) => match never {},
                        };
                        if response.extensions().get::<DropConnection>().is_some() {
                            Err(ConnectionDroppedOnPurpose)
                        } else {
                            Ok::<_, ConnectionDroppedOnPurpose>(response)
                        }
                    }
                });
                let connection = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .into_owned();
                let mut closing = closing_rx.clone();
                connections.spawn(async move {
                    tokio::pin!(connection);
                    tokio::select! {
                        _ = connection.as_mut() => return,
                        _ = closing.wait_for(|closing| *closing) => {}
                    }
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                });
            }
        }
    }
    drop(listener);
    let _ = closing_tx.send(true);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    // Dropping `connections` aborts whatever is still running (e.g. a slow-answer fault).
}
