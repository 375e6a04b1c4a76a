//! clawq's peer benchmark: the same workload (revocation events published in batches of
//! 100, consumed in batches of 100, each acked, durable storage where the system has it)
//! through `clawq serve`, NATS JetStream and Miniflare's local queues, in interleaved
//! rounds; prints msg/s, CPU per message and peak RSS of each server, and clawq's ratios
//! to each peer. `bench/peers/run` installs the peers, builds this and runs it.

mod procs;
mod systems;
mod workload;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use systems::Setup;
use workload::Measurement;

/// The systems, in the order each round runs them: the peers, and two variants of clawq
/// for its own before/after figures: `clawq-full` (the same binary with `durability =
/// "full"`) and `clawq-before` (another build, `--clawq-before`, with its default config).
const SYSTEMS: [&str; 5] = ["clawq", "clawq-full", "clawq-before", "nats", "miniflare"];

/// The systems run when `--only` is not given.
const DEFAULT_SYSTEMS: [&str; 3] = ["clawq", "nats", "miniflare"];

/// The command line: `--name value` pairs.
struct Args {
    messages: usize,
    rounds: usize,
    only: Vec<String>,
    setup: Setup,
}

fn parse_args() -> Result<Args> {
    let mut messages = 100_000;
    let mut rounds = 3;
    let mut only: Vec<String> = DEFAULT_SYSTEMS.iter().map(|s| s.to_string()).collect();
    let mut paths: std::collections::HashMap<String, PathBuf> = Default::default();
    let mut args = std::env::args().skip(1);
    while let Some(name) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{name} needs a value"))?;
        match name.as_str() {
            "--messages" => messages = value.parse()?,
            "--rounds" => rounds = value.parse()?,
            "--only" => only = value.split(',').map(str::to_owned).collect(),
            "--clawq" | "--clawq-before" | "--nats-server" | "--node" | "--miniflare-host"
            | "--work" => {
                paths.insert(name[2..].to_owned(), value.into());
            }
            _ => bail!("unknown argument {name}"),
        }
    }
    if let Some(s) = only.iter().find(|s| !SYSTEMS.contains(&s.as_str())) {
        bail!("unknown system {s} (one of {SYSTEMS:?})");
    }
    if messages == 0 || messages % workload::BATCH != 0 || rounds == 0 {
        bail!(
            "--messages must be a positive multiple of {}, --rounds positive",
            workload::BATCH
        );
    }
    let mut path = |name: &str| {
        paths
            .remove(name)
            .with_context(|| format!("--{name} is required"))
    };
    let work = path("work")?;
    let clawq_before = match only.iter().any(|s| s == "clawq-before") {
        true => Some(path("clawq-before")?),
        false => None,
    };
    let setup = Setup {
        clawq: path("clawq")?,
        clawq_before,
        nats_server: path("nats-server")?,
        node: path("node")?,
        miniflare_host: path("miniflare-host")?,
        pid_file: work.join("servers.pids"),
        work,
        // At least a minute, and no slower than 500 msg/s.
        run_limit: Duration::from_secs((messages as u64 / 500).max(60)),
    };
    Ok(Args {
        messages,
        rounds,
        only,
        setup,
    })
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// min, median, max of `values` (sorted here).
fn spread(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(|a, b| a.total_cmp(b));
    let mid = values.len() / 2;
    let median = if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    };
    (values[0], median, values[values.len() - 1])
}

fn main() -> Result<()> {
    let args = parse_args()?;
    std::fs::create_dir_all(&args.setup.work)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let bodies = workload::bodies(args.messages);
    let body_bytes = bodies.iter().map(String::len).sum::<usize>() / bodies.len();
    println!(
        "peer benchmark: {} messages (JSON, {body_bytes} B on average), published in batches of \
         {b} (one batch in flight), consumed in batches of {b}, each acked; {} interleaved rounds",
        args.messages,
        args.rounds,
        b = workload::BATCH,
    );
    println!("load average at the start: {}", load_average());
    let mut results: Vec<(String, Vec<Measurement>)> =
        args.only.iter().map(|s| (s.clone(), Vec::new())).collect();
    for round in 1..=args.rounds {
        for (system, runs) in results.iter_mut() {
            let name = format!("{system}-{round}");
            let setup = &args.setup;
            let m = runtime.block_on(async {
                match system.as_str() {
                    "clawq" => systems::clawq(setup, &setup.clawq, "", &name, &bodies).await,
                    "clawq-full" => {
                        let full = "durability = \"full\"\n";
                        systems::clawq(setup, &setup.clawq, full, &name, &bodies).await
                    }
                    "clawq-before" => {
                        let before = setup.clawq_before.as_ref().expect("checked by parse_args");
                        systems::clawq(setup, before, "", &name, &bodies).await
                    }
                    "nats" => systems::nats(setup, &name, &bodies).await,
                    _ => systems::miniflare(setup, &name, &bodies).await,
                }
            });
            let m = m.with_context(|| {
                format!(
                    "round {round}, {system} (log: {})",
                    setup.work.join(&name).join("server.log").display()
                )
            })?;
            println!(
                "round {round} {system:<10} {:>8.0} msg/s (publish {:>8.0} msg/s)  CPU {:>6.1} µs/msg  peak RSS {:>6.1} MiB",
                m.rate,
                m.publish_rate,
                m.cpu_per_message * 1e6,
                mib(m.peak_rss)
            );
            if !m.detail.is_empty() {
                println!("        {system:<10} {}", m.detail);
            }
            runs.push(m);
            // Only the last run's data stays, for a look after the bench.
            let _ = std::fs::remove_dir_all(setup.work.join(&name).join("data"));
            let _ = std::fs::remove_dir_all(setup.work.join(&name).join("store"));
            let _ = std::fs::remove_dir_all(setup.work.join(&name).join("persist"));
        }
    }
    println!("load average at the end: {}", load_average());
    report(&results);
    Ok(())
}

/// The first three fields of `/proc/loadavg`: other work on the machine skews the figures.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The summary: min/median/max per system and metric, then clawq's ratios to each peer.
fn report(results: &[(String, Vec<Measurement>)]) {
    type Metric = (&'static str, fn(&Measurement) -> f64, usize);
    let metrics: [Metric; 4] = [
        ("msg/s", |m| m.rate, 0),
        ("publish msg/s", |m| m.publish_rate, 0),
        ("CPU µs/msg", |m| m.cpu_per_message * 1e6, 1),
        ("peak RSS MiB", |m| mib(m.peak_rss), 1),
    ];
    let fmt = |v: f64, decimals: &usize| format!("{v:.decimals$}");
    println!();
    println!("min / median / max over the rounds:");
    println!(
        "| system | {} |",
        metrics.iter().map(|m| m.0).collect::<Vec<_>>().join(" | ")
    );
    println!("|---|{}", "---|".repeat(metrics.len()));
    let mut medians: Vec<(String, Vec<f64>)> = Vec::new();
    for (system, runs) in results {
        let mut cells = Vec::new();
        let mut meds = Vec::new();
        for (_, get, decimals) in &metrics {
            let (lo, med, hi) = spread(runs.iter().map(get).collect());
            cells.push(format!(
                "{} / **{}** / {}",
                fmt(lo, decimals),
                fmt(med, decimals),
                fmt(hi, decimals)
            ));
            meds.push(med);
        }
        println!("| {system} | {} |", cells.join(" | "));
        medians.push((system.clone(), meds));
    }
    let Some((_, clawq)) = medians.iter().find(|(s, _)| s == "clawq") else {
        return;
    };
    println!();
    println!(
        "clawq / peer, of the medians (msg/s: above 1 is clawq faster; CPU and RSS: above 1 is clawq costlier):"
    );
    println!(
        "| clawq / peer | {} |",
        metrics.iter().map(|m| m.0).collect::<Vec<_>>().join(" | ")
    );
    println!("|---|{}", "---|".repeat(metrics.len()));
    for (system, meds) in medians.iter().filter(|(s, _)| s != "clawq") {
        let ratios: Vec<String> = clawq
            .iter()
            .zip(meds)
            .map(|(c, p)| format!("{:.2}", c / p))
            .collect();
        println!("| clawq / {system} | {} |", ratios.join(" | "));
    }
}
