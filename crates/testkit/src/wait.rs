//! Waiting for a condition, and stopping an in-process pipeline.

use std::time::{Duration, Instant};

/// Polls `done` every 100 ms until it holds or `limit` has passed; says whether it held.
pub async fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
}

/// Lets the last offsets be stored and committed for `linger`, then stops a pipeline started
/// with `pipeline::run(.., async { stopped.await })` and waits (30 s at most) for its drain.
pub async fn stop_pipeline(
    stop: tokio::sync::oneshot::Sender<()>,
    run: tokio::task::JoinHandle<anyhow::Result<()>>,
    linger: Duration,
) {
    tokio::time::sleep(linger).await;
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("pipeline stops within the drain deadline")
        .unwrap()
        .unwrap();
}
