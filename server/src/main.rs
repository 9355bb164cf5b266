//! `freshness-hub`: parse the configuration, set up telemetry, bind, run.

use std::process::ExitCode;

use freshness_hub::{Args, telemetry};
use tokio_util::sync::CancellationToken;

/// Exit status for an invalid configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    // Every config error is one line naming its source, key, value and
    // what is expected (SPEC §4), before anything is bound.
    let config = match Args::load(std::env::args_os()) {
        Ok(Ok(c)) => c,
        Ok(Err(help)) => {
            // --help and --version.
            let _ = help.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("freshness-hub: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("freshness-hub: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The OTLP exporter's channel lives on the runtime; the guard flushes
    // the last spans when dropped, after `block_on`, while the runtime runs.
    let _telemetry = match runtime.block_on(async { telemetry::init(&config) }) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("freshness-hub: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // TLS and auth files are read before anything else is opened: a missing
    // or invalid one exits 64, naming it.
    if let Err(e) = freshness_hub::load_security(&config) {
        eprintln!("freshness-hub: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    // The log is opened and checked before any port is bound: a directory
    // the hub cannot use exits 64, a damaged log 65 (unless --repair); an
    // unreachable or misconfigured JetStream log exits 64.
    let opened = if config.log == freshness_hub::LogBackend::JetStream {
        runtime
            .block_on(freshness_hub::jetstream::open(&config))
            .map(|o| Some(freshness_hub::hub::Durable::JetStream(o)))
    } else {
        freshness_hub::open_log(&config)
    };
    let opened = match opened {
        Ok(o) => o,
        Err(e) => {
            eprintln!("freshness-hub: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(config.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("freshness-hub: cannot listen on {}: {e}", config.listen);
                return ExitCode::FAILURE;
            }
        };
        let http = match tokio::net::TcpListener::bind(config.metrics_listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!(
                    "freshness-hub: cannot serve metrics and the status page on {}: {e}",
                    config.metrics_listen
                );
                return ExitCode::FAILURE;
            }
        };
        if let Err(e) = freshness_hub::metrics::install_recorder() {
            eprintln!("freshness-hub: {e}");
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
        match freshness_hub::serve_with_http(config, opened, listener, Some(http), shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("freshness-hub: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
