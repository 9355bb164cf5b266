//! `freshness-chaos`: runs seeded chaos scenarios and prints what the
//! freshness checker found. Exits 1 on any violation.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use freshness_chaos::report::violation_text;
use freshness_chaos::{Options, Summary, WorldKind, run_world_seed_with};
use tokio::time::Instant;

/// Seeded chaos scenarios against real hubs and cache nodes on loopback.
#[derive(Debug, Parser)]
#[command(name = "freshness-chaos", version)]
struct Args {
    /// The world: `hub` (hubs, client-library nodes, writers that publish),
    /// `relay` (PostgreSQL outbox and `freshness-relay` processes) or
    /// `agent` (Redis caches behind `freshness-agent` processes).
    #[arg(long, default_value = "hub")]
    world: WorldKind,
    /// Run this seed.
    #[arg(long, conflicts_with_all = ["seeds", "duration"])]
    seed: Option<u64>,
    /// Run these seeds: `A..B` (B excluded) or `A..=B`.
    #[arg(long, value_parser = parse_range, conflicts_with = "duration")]
    seeds: Option<(u64, u64)>,
    /// Soak: run random seeds back to back until this much time has passed
    /// (`30m`, `2h`); the last seed finishes.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Traffic and faults per seed.
    #[arg(long, default_value = "6s", value_parser = humantime::parse_duration)]
    seed_duration: Duration,
    /// Print one JSON summary object on stdout (progress goes to stderr).
    #[arg(long)]
    json: bool,
    /// Print each seed's fault schedule before running it.
    #[arg(long, short)]
    verbose: bool,
    /// Print each seed's world and fault schedule, run nothing (to choose
    /// seeds that inject given faults).
    #[arg(long)]
    dry_run: bool,
    /// Every link over TLS with authentication on (mTLS, a policy); the hub
    /// world only.
    #[arg(long)]
    secure: bool,
}

fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let bad = || format!("{s:?} is not A..B or A..=B");
    let (a, b, inclusive) = if let Some((a, b)) = s.split_once("..=") {
        (a, b, true)
    } else {
        let (a, b) = s.split_once("..").ok_or_else(bad)?;
        (a, b, false)
    };
    let a: u64 = a.trim().parse().map_err(|_| bad())?;
    let b: u64 = b.trim().parse().map_err(|_| bad())?;
    let end = if inclusive {
        b.checked_add(1).ok_or_else(bad)?
    } else {
        b
    };
    if end <= a {
        return Err(format!("{s:?} is empty"));
    }
    Ok((a, end))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("freshness-chaos: error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(summary) if summary.total.violations > 0 => ExitCode::from(1),
        Ok(summary) if summary.error_count > 0 => ExitCode::from(2),
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("freshness-chaos: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<Summary> {
    let mut summary = Summary {
        world: args.world.as_str(),
        ..Summary::default()
    };
    let soak_until = args.duration.map(|d| Instant::now() + d);
    let seeds: Box<dyn Iterator<Item = u64>> = match (args.seed, args.seeds) {
        (Some(s), _) => Box::new(std::iter::once(s)),
        (None, Some((a, b))) => Box::new(a..b),
        (None, None) if soak_until.is_some() => Box::new(std::iter::repeat_with(rand::random)),
        (None, None) => Box::new(std::iter::once(rand::random())),
    };
    for seed in seeds {
        if soak_until.is_some_and(|t| Instant::now() >= t) {
            break;
        }
        if args.verbose || args.dry_run {
            let (world, schedule) = args.world.describe(seed, args.seed_duration);
            eprintln!("seed {seed}: {world}");
            for line in schedule {
                eprintln!("  {line}");
            }
            if args.dry_run {
                continue;
            }
        }
        let options = Options {
            duration: args.seed_duration,
            drop_one_in: None,
            secure: args.secure,
        };
        let report = match run_world_seed_with(args.world, seed, options).await {
            Ok(r) => r,
            Err(e) => {
                // A failed seed is a finding too: say which, and go on.
                eprintln!("seed {seed}: FAILED: {e:#}");
                summary.add_error(seed, &e);
                continue;
            }
        };
        let faults = report
            .faults
            .iter()
            .map(|(k, v)| format!("{k}x{v}"))
            .collect::<Vec<_>>()
            .join(" ");
        if args.world == WorldKind::Relay {
            eprintln!(
                "seed {seed}: {} nodes, {} rows committed, {} events applied, faults {faults}, {} violations",
                report.nodes, report.commits, report.events_applied, report.violations
            );
        } else {
            eprintln!(
                "seed {seed}: {} regions, {} nodes, {} reads ({} hits), {} events, faults {faults}, {} violations",
                report.regions,
                report.nodes,
                report.reads,
                report.hits,
                report.events,
                report.violations
            );
        }
        if !report.counters.is_empty() {
            eprintln!(
                "  {}",
                report
                    .counters
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        for v in &report.violation_reports {
            eprint!("{}", violation_text(v));
        }
        if report.violations > 0 {
            eprintln!("  schedule of seed {seed}:");
            for line in &report.schedule {
                eprintln!("    {line}");
            }
        }
        summary.add(report);
    }
    if args.dry_run {
        return Ok(summary);
    }
    if args.json {
        println!("{}", summary.json());
    } else {
        print!("{}", summary.text());
    }
    Ok(summary)
}
