//! The admin HTTP server on `[admin] listen`: `GET /metrics` (Prometheus text), `GET /healthz`
//! (the process answers), `GET /readyz` (partitions assigned, broker and provider reachable,
//! not shutting down). Nothing here reads configuration or secrets: the metrics carry none
//! (their labels are topics, partitions, reasons, contracts), and readiness details name config
//! keys, never values.

pub mod readiness;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use readiness::Readiness;

/// Prometheus' text exposition format.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The routes, for [`serve`] and for tests that call the router directly.
pub fn router(readiness: Arc<Readiness>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(readiness)
}

/// Serves the admin routes on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    readiness: Arc<Readiness>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(readiness))
        .with_graceful_shutdown(shutdown)
        .await
}

/// A running admin server; [`AdminServer::stop`] ends it.
pub struct AdminServer {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl AdminServer {
    /// Binds `listen` (an `IP:PORT`; `[admin] listen`) and serves in the background.
    pub async fn start(listen: &str, readiness: Arc<Readiness>) -> anyhow::Result<AdminServer> {
        let listener = TcpListener::bind(listen).await.map_err(|e| {
            anyhow::anyhow!(
                "admin.listen: cannot listen on {listen:?}: {e}; pick a free port, or set \
                 listen = \"\" to run without /metrics, /healthz and /readyz"
            )
        })?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, readiness, async {
            let _ = stopped.await;
        }));
        tracing::info!(%addr, "admin server listening: /metrics, /healthz, /readyz");
        Ok(AdminServer { addr, stop, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and waits (briefly) for answers in progress.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let mut task = self.task;
        // A scraper holding a keep-alive connection must not delay the exit.
        if tokio::time::timeout(Duration::from_secs(2), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

async fn metrics() -> Response {
    let body = crate::telemetry::metrics_handle().render();
    ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], body).into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(readiness): State<Arc<Readiness>>) -> Response {
    let report = readiness.report();
    let status = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(report)).into_response()
}
