//! The admin HTTP server on `[admin] listen`: `GET /` (the status page, HTML), `GET /metrics`
//! (Prometheus text), `GET /healthz` (the process answers), `GET /readyz` (partitions assigned,
//! broker and provider reachable, not shutting down). Nothing here reads configuration or
//! secrets: the metrics carry none (their labels are topics, partitions, reasons, contracts),
//! readiness details name config keys, never values, and the status page's error texts have
//! credentials blanked (`telemetry::recent_errors`).

pub mod readiness;
pub mod status;

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
pub use status::StatusBoard;

/// What the routes read.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub readiness: Arc<Readiness>,
    pub status: Arc<StatusBoard>,
}

impl AdminState {
    pub fn new(readiness: Arc<Readiness>, status: Arc<StatusBoard>) -> Self {
        AdminState { readiness, status }
    }
}

/// Prometheus' text exposition format.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The routes, for [`serve`] and for tests that call the router directly.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Serves the admin routes on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
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
    pub async fn start(listen: &str, state: AdminState) -> anyhow::Result<AdminServer> {
        let listener = TcpListener::bind(listen).await.map_err(|e| {
            anyhow::anyhow!(
                "admin.listen: cannot listen on {listen:?}: {e}; pick a free port, or set \
                 listen = \"\" to run without the status page, /metrics, /healthz and /readyz"
            )
        })?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, state, async {
            let _ = stopped.await;
        }));
        tracing::info!(%addr, "admin server listening: / (status page), /metrics, /healthz, /readyz");
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

/// The status page: HTML, rendered per request from what the pipeline knows.
async fn status_page(State(state): State<AdminState>) -> Response {
    let view = state.status.view(
        &state.readiness,
        crate::telemetry::recent_errors::recent_errors().newest_first(),
    );
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            // Nothing on the page is fetched or run: forbid everything but its inline style.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'; form-action 'none'; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        status::render(&view),
    )
        .into_response()
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let report = state.readiness.report();
    let status = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(report)).into_response()
}
