//! `freshness-agent`: parse the configuration, set up telemetry, run.

use std::process::ExitCode;

use clap::Parser;
use freshness_agent::Args;
use tokio_util::sync::CancellationToken;

/// Exit status for an invalid configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let first = e.to_string();
            let line = first.lines().next().unwrap_or("invalid arguments");
            eprintln!("freshness-agent: {}", line.trim_start_matches("error: "));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("freshness-agent: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("freshness-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Logs on stderr (FRESHNESS_LOG, default info) and span export from the
    // OTEL_* variables; the guard flushes the last spans when dropped.
    let _telemetry = match runtime
        .block_on(async { freshness_client::telemetry::init("freshness-agent", "info") })
    {
        Ok(t) => t,
        Err(e) => {
            eprintln!("freshness-agent: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    runtime.block_on(async move {
        if let Some(addr) = config.metrics_listen
            && let Err(e) = freshness_agent::metrics::install(addr)
        {
            eprintln!("freshness-agent: {e}");
            return ExitCode::FAILURE;
        }
        let shutdown = CancellationToken::new();
        {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                freshness_telemetry::shutdown_signal().await;
                shutdown.cancel();
            });
        }
        match freshness_agent::run(config, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("freshness-agent: {}", freshness_client::error_chain(&e));
                ExitCode::FAILURE
            }
        }
    })
}
