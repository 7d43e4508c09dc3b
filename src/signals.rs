//! Shutdown signals, caught from the start of the process.

/// SIGTERM and SIGINT, caught from the moment this is made.
///
/// Made first thing in `main`: until a handler is registered, the default action of SIGTERM
/// kills the process, so a pod stopped during a slow start (a broker or a ledger that does not
/// answer yet) would exit 143 instead of draining and exiting 0. A signal that arrives before
/// anyone waits is kept and seen by the first [`ShutdownSignals::recv`].
pub struct ShutdownSignals {
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
}

impl ShutdownSignals {
    /// Registers the handlers. Needs a Tokio runtime context (`Runtime::enter`).
    pub fn install() -> ShutdownSignals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let terminate = signal(SignalKind::terminate())
                .map_err(|e| eprintln!("warning: cannot catch SIGTERM: {e}"))
                .ok();
            let interrupt = signal(SignalKind::interrupt())
                .map_err(|e| eprintln!("warning: cannot catch SIGINT: {e}"))
                .ok();
            ShutdownSignals {
                terminate,
                interrupt,
            }
        }
        #[cfg(not(unix))]
        ShutdownSignals {}
    }

    /// Resolves on the first SIGTERM or SIGINT (also one that came before this was called).
    pub async fn recv(mut self) {
        #[cfg(unix)]
        {
            async fn next(signal: &mut Option<tokio::signal::unix::Signal>) {
                match signal {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            }
            tokio::select! {
                _ = next(&mut self.interrupt) => tracing::info!("SIGINT received"),
                _ = next(&mut self.terminate) => tracing::info!("SIGTERM received"),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("Ctrl-C received");
        }
    }
}
