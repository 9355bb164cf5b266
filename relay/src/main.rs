//! `freshness-relay`: `migrate` creates the outbox; `run` parses the
//! configuration, sets up telemetry and metrics, and runs the relay until
//! SIGTERM or Ctrl-C.

use std::process::ExitCode;

use clap::Parser;
use freshness_relay::{Args, Command, Config, LogFormat};
use freshness_telemetry::Export;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::Layer;

/// Exit status for an invalid configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let first = e.to_string();
            let line = first.lines().next().unwrap_or("invalid arguments");
            eprintln!("freshness-relay: {}", line.trim_start_matches("error: "));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("freshness-relay: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match args.command {
        Command::Migrate { database_url } => runtime.block_on(async move {
            match freshness_relay::migrate(&database_url).await {
                Ok(()) => {
                    println!("freshness-relay: the outbox is in place");
                    ExitCode::SUCCESS
                }
                Err(e @ freshness_relay::MigrateError::Url(_)) => {
                    eprintln!("freshness-relay: flag --database-url: {e}");
                    ExitCode::from(EXIT_CONFIG)
                }
                Err(e) => {
                    eprintln!("freshness-relay: {e}");
                    ExitCode::FAILURE
                }
            }
        }),
        Command::Run(run) => {
            let config = match run.into_config() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("freshness-relay: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            // The OTLP exporter's channel lives on the runtime; the guard
            // flushes the last spans when dropped, while the runtime runs.
            let _telemetry = match runtime.block_on(async { init_telemetry(&config) }) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("freshness-relay: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            runtime.block_on(async move {
                if let Err(e) = freshness_relay::metrics::install(config.metrics_listen) {
                    eprintln!("freshness-relay: {e}");
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
                tracing::info!(hub = %config.hub, batch = config.batch, "relay starting");
                match freshness_relay::run(config, shutdown).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("freshness-relay: {e}");
                        ExitCode::from(EXIT_CONFIG)
                    }
                }
            })
        }
    }
}

/// Logs on stderr (`FRESHNESS_LOG`, default `info`) and span export as the
/// hub does it (`OTEL_*` or `otlp_endpoint`).
fn init_telemetry(
    config: &Config,
) -> Result<freshness_telemetry::Telemetry, freshness_telemetry::TelemetryError> {
    let export = Export::from_env(config.otlp_endpoint.as_deref())?;
    let provider = freshness_telemetry::tracer_provider(export, "freshness-relay", [])?;
    let filter = freshness_telemetry::log_filter("info");
    let logs = match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    freshness_telemetry::install(logs, provider, "freshness-relay")
}
