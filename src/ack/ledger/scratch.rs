//! Throw-away PostgreSQL databases, one per test or benchmark run, so that no result depends
//! on what an earlier run left in a shared database (a fresh machine has none of it).

use sqlx::Connection;

/// The server tests use: `METERFLOW_TEST_POSTGRES`, or 127.0.0.1:5432's `test` database.
pub fn server_url() -> String {
    std::env::var("METERFLOW_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A database created for one run and dropped (`WITH (FORCE)`) when this is dropped.
pub struct ScratchDatabase {
    /// Connection URL of the new database.
    pub url: String,
    admin_url: String,
    name: String,
}

impl ScratchDatabase {
    /// Creates `meterflow_scratch_<random>` on the server of `admin_url`.
    pub async fn create(admin_url: &str) -> Result<ScratchDatabase, sqlx::Error> {
        let name = format!("meterflow_scratch_{:016x}", rand::random::<u64>());
        let mut admin = sqlx::PgConnection::connect(admin_url).await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await?;
        let _ = admin.close().await;
        let (server, query) = match admin_url.split_once('?') {
            Some((base, query)) => (base, format!("?{query}")),
            None => (admin_url, String::new()),
        };
        let server = server.rsplit_once('/').map_or(server, |(s, _)| s);
        Ok(ScratchDatabase {
            url: format!("{server}/{name}{query}"),
            admin_url: admin_url.to_string(),
            name,
        })
    }

    /// For tests: a scratch database on [`server_url`], or `None` (with a note) when no
    /// PostgreSQL answers outside CI. Under CI (`CI` set) an unreachable server is a failure.
    // Test support, never called by the service: a panic is how a test fails.
    #[allow(clippy::panic)]
    pub async fn for_test() -> Option<ScratchDatabase> {
        let server = server_url();
        match ScratchDatabase::create(&server).await {
            Ok(db) => Some(db),
            Err(e) if std::env::var_os("CI").is_none() => {
                eprintln!("skipping: PostgreSQL not reachable at {server}: {e}");
                None
            }
            Err(e) => panic!("PostgreSQL must be reachable in CI ({server}): {e}"),
        }
    }
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        // Drop runs inside a Tokio runtime as often as not: a thread of its own with a runtime
        // of its own can block on the statement either way.
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let mut admin = sqlx::PgConnection::connect(&admin_url)
                    .await
                    .map_err(|e| e.to_string())?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut admin)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("could not drop scratch database {}: {e}", self.name);
        }
    }
}
