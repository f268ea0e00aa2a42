//! Benchmarks of the GCA services: `scripts/bench [NAME...]`, or, with a test PostgreSQL
//! server at hand, `cargo bench -p integration-tests --bench gca -- [NAME...]`. How to read
//! the results: `docs/benchmarks.md`.
//!
//! Each benchmark starts real components with the test harness (a GCS on port 0 over a fresh
//! database on the test PostgreSQL cluster, real CTS servers, real jobs, real CRIU) and
//! measures one thing against a baseline that does the same work without the part under
//! test, in the same run. Measurement and baseline are repeated interleaved (the order
//! rotates every repetition, so drift on a shared machine hits both alike), after warm-up
//! repetitions that are not counted. Every sample is a time per unit of work (an operation,
//! or a MiB); the report gives the median and the range over the repetitions, and the ratio
//! of the time per unit to the baseline's, paired per repetition, which is what compares
//! across machines.
//!
//! Not a test: `harness = false` and no `test = true`, so `cargo test` and `cargo nextest` do
//! not run it; `cargo clippy --all-targets` compiles it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use gca_protocol::client::SoapClient;
use gca_protocol::messages::*;
use gca_protocol::ops::{
    CtsDoCheckpointOp, DoCheckpointOp, RegisterCheckpointOp, RegisterCtsInstanceOp, RegisterJobOp,
};
use gca_store::{ImageId, ImageMeta, ImageStore, Manifest};
use integration_tests::cts::{register_type, TestCts, TestJob, APP_DRIVER, CRIU_DRIVER};
use integration_tests::{db, instance, TestGcs};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

#[path = "gca/tier.rs"]
mod tier;

const BENCHES: &[(&str, &str)] = &[
    (
        "register",
        "GCS bookkeeping: RegisterCheckpoint over SOAP and in-process vs its core SQL \
         transaction, 1 and 8 concurrent clients",
    ),
    (
        "routing",
        "DoCheckpoint through the GCS vs sent to the CTS directly (application-level job)",
    ),
    (
        "tls",
        "the cost of mutual TLS and signed records: RegisterCheckpoint throughput and \
         DoCheckpoint latency vs the same system in insecure mode",
    ),
    (
        "fetch",
        "verified image fetch between two CTSes vs a plain HTTP download, a one-pass verified \
         download and a local copy",
    ),
    (
        "criu",
        "CRIU checkpoint of a 64 MiB job through the CTS (steady state and into an empty \
         store) vs `criu dump` run directly on the same process",
    ),
    (
        "dedup",
        "stored bytes of 8 CRIU checkpoints of a 64 MiB job changing a few pages between them \
         vs one image",
    ),
    (
        "hash",
        "the chunk hash: BLAKE3 (one thread, all threads) and the store's FastCDC cut + BLAKE3 \
         vs SHA-256 (sha2, SHA-NI when the CPU has it), 64 MiB in memory",
    ),
    (
        "rpdoc",
        "the GCS's resource property document (which brokers poll) on a registry of 10^6 \
         checkpoint records vs on one of 2; its kept counts vs counting every row",
    ),
    (
        "vmm",
        "a VM checkpoint through the CTS vs QMP's own save of the same VM (drive-backup and \
         migrate to a file)",
    ),
    (
        "tier",
        "the object-store tier: upload and download of an image through it vs a plain PUT/GET \
         of the same bytes to the same 3-node Garage; a CRIU checkpoint with durability \
         `replicated` vs `local`",
    ),
];

const USAGE: &str = "\
usage: scripts/bench [OPTIONS] [BENCH...]
       cargo bench -p integration-tests --bench gca -- [OPTIONS] [BENCH...]

Runs the named benchmarks (default: all) and prints a Markdown table; see docs/benchmarks.md.
Uses the test PostgreSQL server at GCA_TEST_DATABASE_URL, which scripts/bench sets up (without
it the test harness starts its private cluster and leaves it running, as under cargo test).
`criu` needs root and CRIU >= 4.1; `vmm` needs QEMU and the guest of scripts/build-vmm-guest.

options:
  --reps N        counted repetitions of every measurement (default 7)
  --warmup N      repetitions run first and not counted (default 1)
  --window-ms N   how long one throughput repetition runs (default 1000)
  --image-mib N   size of the image the fetch benchmark copies (default 128)
  --quick         a smoke run: 3 repetitions, 300 ms windows, a 32 MiB image
  --json PATH     also write the results as JSON (default target/bench/results.json)
  --no-json       do not write JSON
  --list          list the benchmarks
";

/// One run's settings.
#[derive(Debug, Clone, Serialize)]
struct Options {
    benches: Vec<String>,
    reps: usize,
    warmup: usize,
    window_ms: u64,
    image_mib: u64,
    quick: bool,
    #[serde(skip)]
    json: Option<PathBuf>,
}

impl Options {
    fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms)
    }
}

fn parse_args() -> Result<Options, String> {
    let mut benches = Vec::new();
    let (mut reps, mut warmup, mut window, mut image) = (None, None, None, None);
    let mut quick = false;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is inside the workspace");
    let mut json = Some(workspace.join("target/bench/results.json"));
    let mut args = std::env::args().skip(1);
    let number = |flag: &str, v: Option<String>| -> Result<u64, String> {
        v.as_deref()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|n| *n > 0 || flag == "--warmup")
            .ok_or_else(|| format!("{flag} needs a positive number"))
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            // What `cargo bench` passes to every bench target.
            "--bench" => {}
            "-h" | "--help" => {
                print!("{USAGE}");
                list();
                std::process::exit(0);
            }
            "--list" => {
                list();
                std::process::exit(0);
            }
            "--quick" => quick = true,
            "--reps" => reps = Some(number(&a, args.next())? as usize),
            "--warmup" => warmup = Some(number(&a, args.next())? as usize),
            "--window-ms" => window = Some(number(&a, args.next())?),
            "--image-mib" => image = Some(number(&a, args.next())?),
            "--json" => json = Some(PathBuf::from(args.next().ok_or("--json needs a path")?)),
            "--no-json" => json = None,
            s if s.starts_with('-') => return Err(format!("unknown option {s}\n\n{USAGE}")),
            name => {
                if !BENCHES.iter().any(|(n, _)| *n == name) {
                    let known: Vec<&str> = BENCHES.iter().map(|(n, _)| *n).collect();
                    return Err(format!(
                        "no benchmark named {name:?}; there are: {}",
                        known.join(", ")
                    ));
                }
                if !benches.iter().any(|b| b == name) {
                    benches.push(name.to_string());
                }
            }
        }
    }
    if benches.is_empty() {
        benches = BENCHES.iter().map(|(n, _)| n.to_string()).collect();
    }
    Ok(Options {
        benches,
        reps: reps.unwrap_or(if quick { 3 } else { 7 }),
        warmup: warmup.unwrap_or(1),
        window_ms: window.unwrap_or(if quick { 300 } else { 1000 }),
        image_mib: image.unwrap_or(if quick { 32 } else { 128 }),
        quick,
        json,
    })
}

fn list() {
    println!("benchmarks:");
    for (name, what) in BENCHES {
        println!("  {name:<9} {what}");
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::from(2);
        }
    };
    let machine_before = Machine::describe().await;
    eprintln!(
        "bench: {} on {}; {} counted repetitions after {} warm-up",
        opts.benches.join(", "),
        machine_before.summary(),
        opts.reps,
        opts.warmup
    );
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for name in &opts.benches {
        let t = Instant::now();
        let o = opts.clone();
        // Each benchmark in its own task: a panic (a failed step) is reported and the others
        // still run.
        let result = match name.as_str() {
            "register" => tokio::spawn(bench_register(o)).await,
            "routing" => tokio::spawn(bench_routing(o)).await,
            "tls" => tokio::spawn(bench_tls(o)).await,
            "fetch" => tokio::spawn(bench_fetch(o)).await,
            "criu" => tokio::spawn(bench_criu(o)).await,
            "dedup" => tokio::spawn(bench_dedup(o)).await,
            "hash" => tokio::spawn(bench_hash(o)).await,
            "rpdoc" => tokio::spawn(bench_rpdoc(o)).await,
            "vmm" => tokio::spawn(bench_vmm(o)).await,
            "tier" => tokio::spawn(tier::bench_tier(o)).await,
            other => unreachable!("unknown benchmark {other}"),
        };
        match result {
            Ok(r) => {
                eprintln!("bench: {name} done in {:.0} s", t.elapsed().as_secs_f64());
                rows.extend(r);
            }
            Err(e) => {
                // The panic's message, without the backtrace an error may carry.
                let why = match e.try_into_panic() {
                    Ok(p) => p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "panicked".into()),
                    Err(e) => e.to_string(),
                };
                let why = why.lines().next().unwrap_or_default().to_string();
                eprintln!("bench: {name} FAILED: {why}");
                failed.push(format!("{name} ({why})"));
            }
        }
    }
    let mut machine = machine_before;
    machine.loadavg_end = loadavg();
    let total = started.elapsed();
    println!();
    println!("{}", machine.summary());
    println!(
        "{} counted repetitions (after {} warm-up) per measurement, interleaved with the \
         baseline; {:.0} s in all.",
        opts.reps,
        opts.warmup,
        total.as_secs_f64()
    );
    println!();
    print_table(&rows);
    if !failed.is_empty() {
        println!();
        println!("FAILED: {}", failed.join(", "));
    }
    if let Some(path) = &opts.json {
        match write_json(path, &opts, &machine, &rows, &failed, total) {
            Ok(()) => eprintln!("bench: results written to {}", path.display()),
            Err(e) => eprintln!("bench: cannot write {}: {e}", path.display()),
        }
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

// ---------------------------------------------------------------------------------------------
// Measurements and the report

/// How a sample (seconds per unit of work) is shown.
#[derive(Debug, Clone, Copy, Serialize)]
enum Unit {
    /// Operations per second (samples: seconds per operation).
    #[serde(rename = "op/s")]
    OpsPerSec,
    /// MiB per second (samples: seconds per MiB).
    #[serde(rename = "MiB/s")]
    MibPerSec,
    /// Milliseconds per operation (samples: seconds per operation).
    #[serde(rename = "ms")]
    Millis,
    /// MiB (samples: MiB; smaller is better).
    #[serde(rename = "MiB")]
    Mib,
}

impl Unit {
    fn show(self, secs_per_unit: f64) -> f64 {
        match self {
            Unit::OpsPerSec | Unit::MibPerSec => 1.0 / secs_per_unit,
            Unit::Millis => secs_per_unit * 1e3,
            Unit::Mib => secs_per_unit,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Unit::OpsPerSec => "op/s",
            Unit::MibPerSec => "MiB/s",
            Unit::Millis => "ms",
            Unit::Mib => "MiB",
        }
    }
}

/// One line of the report: a measurement and its baseline, both as seconds per unit of work,
/// one sample per counted repetition (the i-th samples were taken in the same repetition).
#[derive(Debug, Clone)]
struct Row {
    bench: &'static str,
    measurement: String,
    baseline: String,
    unit: Unit,
    subject: Vec<f64>,
    base: Vec<f64>,
    note: String,
}

impl Row {
    /// Time per unit of the measurement over the baseline's, per repetition.
    fn ratios(&self) -> Vec<f64> {
        self.subject
            .iter()
            .zip(&self.base)
            .map(|(s, b)| s / b)
            .collect()
    }
}

/// Median, minimum, maximum.
#[derive(Debug, Clone, Copy, Serialize)]
struct Summary {
    median: f64,
    min: f64,
    max: f64,
}

fn summarize(values: impl IntoIterator<Item = f64>) -> Summary {
    let mut v: Vec<f64> = values.into_iter().collect();
    assert!(!v.is_empty(), "no samples");
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Summary {
        median,
        min: v[0],
        max: v[n - 1],
    }
}

/// The order of `k` variants in repetition `rep`: rotated by one each time.
fn order(rep: usize, k: usize) -> impl Iterator<Item = usize> {
    (0..k).map(move |i| (i + rep) % k)
}

/// Runs variants `0..k` in every repetition (warm-up ones first, not kept) in rotating order;
/// `run(v)` returns one sample (seconds per unit of work) of variant `v`.
async fn interleaved<F, Fut>(opts: &Options, label: &str, k: usize, mut run: F) -> Vec<Vec<f64>>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = f64>,
{
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    let mut samples = vec![Vec::with_capacity(opts.reps); k];
    let total = opts.warmup + opts.reps;
    let started = Instant::now();
    for rep in 0..total {
        let warm = rep < opts.warmup;
        if tty {
            eprint!(
                "\r  {label}: repetition {}/{total}{}   ",
                rep + 1,
                if warm { " (warm-up)" } else { "" }
            );
        }
        for v in order(rep, k) {
            let s = run(v).await;
            assert!(s.is_finite() && s > 0.0, "{label}: bad sample {s}");
            if !warm {
                samples[v].push(s);
            }
        }
    }
    if tty {
        eprintln!();
    }
    eprintln!(
        "  {label}: {total} repetitions of {k} variants in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    samples
}

fn num(x: f64) -> String {
    let a = x.abs();
    if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn shown(unit: Unit, samples: &[f64]) -> String {
    let s = summarize(samples.iter().map(|x| unit.show(*x)));
    format!(
        "{} {} ({}–{})",
        num(s.median),
        unit.label(),
        num(s.min),
        num(s.max)
    )
}

fn print_table(rows: &[Row]) {
    println!(
        "| benchmark | measurement | median (min–max) | baseline | median (min–max) | time ratio \
         (min–max) | note |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        let ratio = summarize(r.ratios());
        println!(
            "| {} | {} | {} | {} | {} | **{}×** ({}–{}) | {} |",
            r.bench,
            r.measurement,
            shown(r.unit, &r.subject),
            r.baseline,
            shown(r.unit, &r.base),
            num(ratio.median),
            num(ratio.min),
            num(ratio.max),
            r.note
        );
    }
}

fn write_json(
    path: &Path,
    opts: &Options,
    machine: &Machine,
    rows: &[Row],
    failed: &[String],
    total: Duration,
) -> std::io::Result<()> {
    let results: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let side = |samples: &[f64]| {
                let shown: Vec<f64> = samples.iter().map(|x| r.unit.show(*x)).collect();
                serde_json::json!({
                    "summary": summarize(shown.iter().copied()),
                    "samples": shown,
                })
            };
            serde_json::json!({
                "bench": r.bench,
                "measurement": r.measurement,
                "baseline": r.baseline,
                "unit": r.unit,
                "value": side(&r.subject),
                "baseline_value": side(&r.base),
                "time_ratio": {
                    "summary": summarize(r.ratios()),
                    "samples": r.ratios(),
                },
                "note": r.note,
            })
        })
        .collect();
    let doc = serde_json::json!({
        "machine": machine,
        "options": opts,
        "seconds": total.as_secs_f64(),
        "results": results,
        "failed": failed,
    });
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut text = serde_json::to_string_pretty(&doc).map_err(std::io::Error::other)?;
    text.push('\n');
    std::fs::write(path, text)
}

/// What the numbers were measured on.
#[derive(Debug, Clone, Serialize)]
struct Machine {
    cpus: usize,
    cpu_model: String,
    memory_gib: f64,
    kernel: String,
    postgres: String,
    criu: String,
    loadavg_start: String,
    loadavg_end: String,
}

impl Machine {
    async fn describe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, m)| m.trim().to_string())
            .unwrap_or_else(|| "unknown CPU".into());
        let memory_gib = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|kb| kb / (1024.0 * 1024.0))
            .unwrap_or(0.0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let criu = tokio::process::Command::new(gca_drivers::criu::find_criu())
            .arg("--version")
            .output()
            .await
            .ok()
            .and_then(|o| {
                gca_drivers::criu::parse_version(&String::from_utf8_lossy(&o.stdout)).map(|v| {
                    format!(
                        "CRIU {}",
                        v.iter().map(u32::to_string).collect::<Vec<_>>().join(".")
                    )
                })
            })
            .unwrap_or_else(|| "no CRIU".into());
        Machine {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            memory_gib,
            kernel,
            postgres: postgres_version().await,
            criu,
            loadavg_start: loadavg(),
            loadavg_end: String::new(),
        }
    }

    fn summary(&self) -> String {
        let mut s = format!(
            "{} CPUs ({}), {:.0} GiB RAM, Linux {}, {}, {}; load average at start {}",
            self.cpus,
            self.cpu_model,
            self.memory_gib,
            self.kernel,
            self.postgres,
            self.criu,
            self.loadavg_start
        );
        if !self.loadavg_end.is_empty() {
            s.push_str(&format!(", at end {}", self.loadavg_end));
        }
        s
    }
}

/// The 1, 5 and 15 minute load averages.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

async fn postgres_version() -> String {
    use sqlx::Connection;
    let url = db::maintenance_url().await;
    let Ok(mut conn) = sqlx::PgConnection::connect(&url).await else {
        return "PostgreSQL (unreachable)".into();
    };
    let v: String = sqlx::query_scalar("show server_version")
        .fetch_one(&mut conn)
        .await
        .unwrap_or_default();
    let fsync: String = sqlx::query_scalar("show fsync")
        .fetch_one(&mut conn)
        .await
        .unwrap_or_default();
    let _ = conn.close().await;
    let v = v.split_whitespace().next().unwrap_or("?").to_string();
    format!("PostgreSQL {v} (fsync {fsync})")
}

/// Stops the GCS and drops its database.
async fn finish(gcs: TestGcs) {
    let url = gcs.database_url.clone();
    gcs.pool.close().await;
    gcs.shutdown().await;
    db::drop_database(&url).await;
}

// ---------------------------------------------------------------------------------------------
// rpdoc: the GCS's resource property document against the size of the registry

/// Fills a GCS database with `jobs` jobs of `per_job` checkpoint records each, routed to CTS
/// `cts` (type `criu`), in a few large statements (the count triggers run once per statement).
async fn fill_registry(pool: &sqlx::PgPool, cts: &str, jobs: i64, per_job: i64) {
    sqlx::query(
        "insert into jobs (gid, cts_instance, cts_type, state, checkpoint_count)
         select 'fill-' || j, $1, 'criu', 'finished', $3 from generate_series(1, $2) j",
    )
    .bind(cts)
    .bind(jobs)
    .bind(per_job)
    .execute(pool)
    .await
    .expect("insert jobs");
    let chunk = 100.max(jobs / 10);
    let mut from = 1;
    while from <= jobs {
        let to = (from + chunk - 1).min(jobs);
        sqlx::query(
            "insert into checkpoints (id, gid, sequence, cts_name, cts_type, taken_at, image_name,
                                      execution_manager, origin, image_state)
             select 'fill-' || j || '-' || k, 'fill-' || j, k, $1, 'criu', now(),
                    'http://127.0.0.1:9/images/fill-' || j || '-' || k, 'https://node/em',
                    'periodic', 'deleted'
             from generate_series($2::bigint, $3::bigint) j, generate_series(1, $4::bigint) k",
        )
        .bind(cts)
        .bind(from)
        .bind(to)
        .bind(per_job)
        .execute(pool)
        .await
        .expect("insert checkpoint records");
        from = to + 1;
    }
    sqlx::query("vacuum analyze jobs")
        .execute(pool)
        .await
        .expect("vacuum");
    sqlx::query("vacuum analyze checkpoints")
        .execute(pool)
        .await
        .expect("vacuum");
}

async fn rp_document(client: &reqwest::Client, endpoint: &str) {
    let action = gca_protocol::wsrf::rp_request_action("GetResourcePropertyDocument");
    let body = integration_tests::envelope11(
        &action,
        "<wsrf-rp:GetResourcePropertyDocument xmlns:wsrf-rp=\"http://docs.oasis-open.org/wsrf/rp-2\"/>",
    );
    let resp = client
        .post(endpoint)
        .header("content-type", "text/xml; charset=utf-8")
        .header("SOAPAction", action)
        .body(body)
        .send()
        .await
        .expect("GetResourcePropertyDocument");
    assert_eq!(resp.status(), 200, "GetResourcePropertyDocument");
    let text = resp.text().await.expect("the document");
    assert!(
        text.contains("CheckpointCount"),
        "no CheckpointCount: {text}"
    );
}

async fn bench_rpdoc(opts: Options) -> Vec<Row> {
    let (jobs, per_job) = if opts.quick {
        (1_000, 100)
    } else {
        (10_000, 100)
    };
    let records = jobs * per_job;
    let large = TestGcs::start().await;
    register_type(&large, "criu").await;
    large
        .call::<RegisterCtsInstanceOp>(RegisterCtsInstance {
            instance: instance("bench-cts", "criu", "node-a", "http://127.0.0.1:9/cts"),
        })
        .await
        .expect("register a CTS instance");
    let t = Instant::now();
    fill_registry(&large.pool, "bench-cts", jobs, per_job).await;
    eprintln!(
        "  rpdoc: {records} records of {jobs} jobs written in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let kept = gcs::db::totals(&large.pool).await.expect("kept totals");
    let counted = gcs::db::counted_totals(&large.pool)
        .await
        .expect("counted totals");
    assert_eq!(
        (kept.jobs, kept.checkpoints),
        (counted.jobs, counted.checkpoints)
    );
    assert_eq!(counted.checkpoints, records);

    let small = TestGcs::start().await;
    register_type(&small, "criu").await;
    small
        .call::<RegisterCtsInstanceOp>(RegisterCtsInstance {
            instance: instance("bench-cts", "criu", "node-a", "http://127.0.0.1:9/cts"),
        })
        .await
        .expect("register a CTS instance");
    fill_registry(&small.pool, "bench-cts", 1, 2).await;

    let client = integration_tests::http_as(integration_tests::pki::BROKER);
    let calls = if opts.quick { 5 } else { 20 };
    let (large_url, small_url) = (large.endpoint(), small.endpoint());
    let pool = large.pool.clone();
    let s = interleaved(&opts, "rpdoc", 4, |v| {
        let (client, large_url, small_url, pool) = (
            client.clone(),
            large_url.clone(),
            small_url.clone(),
            pool.clone(),
        );
        async move {
            let t = Instant::now();
            for _ in 0..calls {
                match v {
                    0 => rp_document(&client, &large_url).await,
                    1 => rp_document(&client, &small_url).await,
                    2 => {
                        gcs::db::totals(&pool).await.expect("kept totals");
                    }
                    _ => {
                        gcs::db::counted_totals(&pool)
                            .await
                            .expect("counted totals");
                    }
                }
            }
            t.elapsed().as_secs_f64() / calls as f64
        }
    })
    .await;
    let rows = vec![
        Row {
            bench: "rpdoc",
            measurement: format!(
                "GetResourcePropertyDocument of the GCS over SOAP, {records} records of {jobs} jobs"
            ),
            baseline: "the same, 2 records of 1 job".into(),
            unit: Unit::Millis,
            subject: s[0].clone(),
            base: s[1].clone(),
            note: "kept counts: the document does not grow with the records".into(),
        },
        Row {
            bench: "rpdoc",
            measurement: format!(
                "count(*) over jobs and checkpoints (how the document counted before), {records} records"
            ),
            baseline: "the kept counts (sum over the 64 rows of registry_counters)".into(),
            unit: Unit::Millis,
            subject: s[3].clone(),
            base: s[2].clone(),
            note: String::new(),
        },
    ];
    finish(small).await;
    finish(large).await;
    rows
}

// ---------------------------------------------------------------------------------------------
// register: the GCS's checkpoint bookkeeping

/// How a registration reaches the database.
#[derive(Debug, Clone, Copy)]
enum Via {
    /// RegisterCheckpoint over SOAP/HTTP to the GCS server (what a CTS does).
    Soap,
    /// `gcs::Gcs::register_checkpoint` in this process: the service, no HTTP/SOAP.
    Service,
    /// The core of the registration only: one transaction that locks the job row, inserts the
    /// record and updates the job (`gcs::db::lock_job` + `gcs::db::insert_checkpoint`).
    Sql,
    /// [`Via::Sql`] plus the update of the CTS instance's `last_seen` that the service makes
    /// after the transaction (`gcs::db::touch_instance`, at most once a second per instance):
    /// the jobs of one CTS instance share that row.
    SqlTouch,
}

struct RegisterCtx {
    /// The GCS's SOAP endpoint (each CTS calls it with its own certificate).
    endpoint: String,
    service: gcs::Gcs,
    pool: sqlx::PgPool,
    next_id: AtomicU64,
}

/// (clients, CTS instances): one job per client, its CTS instance shared round-robin.
const REGISTER_SETUPS: [(usize, usize); 3] = [(1, 1), (8, 8), (8, 1)];

async fn bench_register(opts: Options) -> Vec<Row> {
    let gcs = TestGcs::start().await;
    register_type(&gcs, "criu").await;
    // All the variants share the server's pool (8 connections, as the harness opens it).
    let ctx = Arc::new(RegisterCtx {
        endpoint: gcs.endpoint(),
        service: gcs::Gcs::new(
            gcs.pool.clone(),
            gcs::Config {
                tls: Some(integration_tests::pki::pki().tls(integration_tests::pki::GCS)),
                ..Default::default()
            },
        )
        .expect("GCS service"),
        pool: gcs.pool.clone(),
        next_id: AtomicU64::new(0),
    });
    let mut rows = Vec::new();
    for (clients, instances) in REGISTER_SETUPS {
        // One job per client: N CTSes registering checkpoints of their jobs, or fewer CTSes
        // with several jobs each.
        for i in 0..instances {
            let cts = format!("bench-cts-{clients}-{instances}-{i}");
            gcs.call::<RegisterCtsInstanceOp>(RegisterCtsInstance {
                instance: instance(
                    &cts,
                    "criu",
                    &format!("node-{cts}"),
                    &format!("http://127.0.0.1:9/{cts}"),
                ),
            })
            .await
            .expect("register a CTS instance");
        }
        let mut jobs = Vec::new();
        for c in 0..clients {
            let cts = format!("bench-cts-{clients}-{instances}-{}", c % instances);
            let gid = format!("bench-job-{clients}-{instances}-{c}");
            gcs.register_job(&gid, &cts).await;
            jobs.push((gid, cts));
        }
        let variants = [Via::Soap, Via::Service, Via::Sql, Via::SqlTouch];
        let window = opts.window();
        let plural = if clients == 1 { "" } else { "s" };
        let who = match (clients, instances) {
            (1, _) => "1 client".to_string(),
            (c, i) if c == i => format!("{c} clients (one CTS instance each)"),
            (c, 1) => format!("{c} clients (jobs of one CTS instance)"),
            (c, i) => format!("{c} clients ({i} CTS instances)"),
        };
        let label = format!("register, {who}");
        let s = interleaved(&opts, &label, variants.len(), |v| {
            register_window(ctx.clone(), variants[v], jobs.clone(), window)
        })
        .await;
        let baseline = format!(
            "core SQL transaction (lock job, insert record, update job; sqlx), {clients} \
             client{plural}"
        );
        rows.push(Row {
            bench: "register",
            measurement: format!("RegisterCheckpoint over SOAP/HTTP to the GCS, {who}"),
            baseline: baseline.clone(),
            unit: Unit::OpsPerSec,
            subject: s[0].clone(),
            base: s[2].clone(),
            note: format!(
                "{} µs/op more than the in-process service",
                num((summarize(s[0].iter().copied()).median
                    - summarize(s[1].iter().copied()).median)
                    * 1e6)
            ),
        });
        rows.push(Row {
            bench: "register",
            measurement: format!(
                "the same through the GCS service in-process (no HTTP/SOAP), {who}"
            ),
            baseline: baseline.clone(),
            unit: Unit::OpsPerSec,
            subject: s[1].clone(),
            base: s[2].clone(),
            note: String::new(),
        });
        rows.push(Row {
            bench: "register",
            measurement: format!(
                "core SQL transaction plus the CTS instance's last_seen update \
                 (gcs::db::touch_instance), {who}"
            ),
            baseline,
            unit: Unit::OpsPerSec,
            subject: s[3].clone(),
            base: s[2].clone(),
            note: String::new(),
        });
    }
    finish(gcs).await;
    rows
}

/// Every client registers checkpoints one after the other until the window closes; returns
/// the seconds per registration over all clients (wall time / registrations).
async fn register_window(
    ctx: Arc<RegisterCtx>,
    via: Via,
    jobs: Vec<(String, String)>,
    window: Duration,
) -> f64 {
    let start = Instant::now();
    let deadline = start + window;
    let tasks: Vec<_> = jobs
        .into_iter()
        .map(|(gid, cts)| {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    register_once(&ctx, via, &gid, &cts).await;
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut ops = 0;
    for t in tasks {
        ops += t.await.expect("a registering client");
    }
    start.elapsed().as_secs_f64() / ops as f64
}

async fn register_once(ctx: &RegisterCtx, via: Via, gid: &str, cts: &str) {
    let id = format!(
        "bench-ck-{}",
        ctx.next_id.fetch_add(1, Ordering::Relaxed) + 1
    );
    let record = integration_tests::signed(CheckpointRecord {
        id: id.clone(),
        gid: gid.to_string(),
        sequence: None,
        cts_name: cts.to_string(),
        cts_type: "criu".into(),
        taken_at: Utc::now(),
        image_name: format!("http://127.0.0.1:9/{cts}/images/{id}"),
        execution_manager: format!("https://node-{cts}/wsrf/services/ManagedJobFactoryService"),
        size_bytes: Some(1 << 20),
        digest: Some(format!("sha256:{}", "ab".repeat(32))),
        parent: None,
        origin: Origin::External,
        job_stopped: false,
        registered_at: None,
        image_state: Default::default(),
        kept_in: None,
        image_error: None,
        owner: Some(integration_tests::current_owner()),
        signature: None,
        facts: None,
        locations: Vec::new(),
    });
    match via {
        Via::Soap => {
            let soap = SoapClient::new(
                integration_tests::http_as(&integration_tests::pki::cts(cts)),
                ctx.endpoint.clone(),
            );
            let r = soap
                .call::<RegisterCheckpointOp>(&RegisterCheckpoint { checkpoint: record })
                .await
                .expect("RegisterCheckpoint over SOAP");
            assert!(r.checkpoint.sequence.is_some());
        }
        Via::Service => {
            let r = ctx
                .service
                .register_checkpoint(
                    &gcs::service::Ctx {
                        gcs_url: String::new(),
                        caller: gca_protocol::identity::Caller::Identified(
                            integration_tests::pki::identity(&integration_tests::pki::cts(cts)),
                        ),
                    },
                    RegisterCheckpoint { checkpoint: record },
                )
                .await
                .expect("RegisterCheckpoint in-process");
            assert!(r.checkpoint.sequence.is_some());
        }
        Via::Sql | Via::SqlTouch => {
            let mut tx = ctx.pool.begin().await.expect("begin");
            let job = gcs::db::lock_job(&mut *tx, gid)
                .await
                .expect("lock the job")
                .expect("the job exists");
            gcs::db::insert_checkpoint(&mut tx, &record, job.checkpoint_count + 1)
                .await
                .expect("insert the record");
            tx.commit().await.expect("commit");
            if matches!(via, Via::SqlTouch) {
                // Where the service does it: after the commit, outside the transaction.
                gcs::db::touch_instance(&ctx.pool, cts)
                    .await
                    .expect("touch the instance");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// routing: DoCheckpoint through the GCS or straight to the CTS

/// The application-level driver, looking for the job's marker every 2 ms (the tests use 20,
/// the default is 100): the poll interval would otherwise dominate the latency.
const APP_DRIVER_FAST_POLL: &str = "kind = \"application\"\npoll_interval_ms = 2";

async fn bench_routing(opts: Options) -> Vec<Row> {
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(&gcs, "bench-app", "app-level", APP_DRIVER_FAST_POLL, "").await;
    let gid = "bench-routing";
    let job = TestJob::app_counter(cts.dir.path(), &[]);
    job.start(&cts.register(gid, job.pid).await);
    job.wait_for_values(2).await;
    let per_rep = if opts.quick { 5 } else { 25 };
    let req = DoCheckpoint {
        gid: gid.into(),
        stop: false,
    };
    let (gcs_ref, cts_ref, req_ref) = (&gcs, &cts, &req);
    let s = interleaved(&opts, "routing", 2, |v| async move {
        let start = Instant::now();
        for _ in 0..per_rep {
            let record = if v == 0 {
                gcs_ref
                    .call::<DoCheckpointOp>(req_ref.clone())
                    .await
                    .expect("DoCheckpoint through the GCS")
            } else {
                cts_ref
                    .soap
                    .call::<CtsDoCheckpointOp>(req_ref)
                    .await
                    .expect("DoCheckpoint at the CTS")
            };
            assert!(record.sequence.is_some(), "the GCS numbered the checkpoint");
        }
        start.elapsed().as_secs_f64() / per_rep as f64
    })
    .await;
    assert!(job.running(), "the job survived its checkpoints");
    let delta = summarize(s[0].iter().zip(&s[1]).map(|(a, b)| (a - b) * 1e3));
    let rows = vec![Row {
        bench: "routing",
        measurement: "DoCheckpoint to the GCS, which forwards it to the CTS (application-level \
                      job, one call at a time)"
            .into(),
        baseline: "the same DoCheckpoint sent to the CTS's SOAP endpoint".into(),
        unit: Unit::Millis,
        subject: s[0].clone(),
        base: s[1].clone(),
        note: format!(
            "routing adds {} ms per call ({}–{}); {per_rep} calls per repetition",
            num(delta.median),
            num(delta.min),
            num(delta.max)
        ),
    }];
    drop(job);
    drop(cts);
    finish(gcs).await;
    rows
}

// ---------------------------------------------------------------------------------------------
// tls: what mutual TLS and signed records cost, against the same system without them

/// A GCS and an application-level CTS with one running job: with mutual TLS (the default) or
/// in insecure mode (plain HTTP, no identities, unsigned records).
struct System {
    gcs: TestGcs,
    cts: TestCts,
    job: TestJob,
    gid: String,
}

async fn system(insecure: bool, database_url: &str) -> System {
    let gcs = if insecure {
        TestGcs::start_on(database_url, |c| {
            c.tls = None;
            c.insecure = true;
        })
        .await
    } else {
        TestGcs::start_on(database_url, |_| {}).await
    };
    let (name, gid) = if insecure {
        ("bench-plain", "bench-tls-plain")
    } else {
        ("bench-mtls", "bench-tls-mtls")
    };
    let extra = if insecure { "insecure = true" } else { "" };
    let cts = TestCts::registered(&gcs, name, "app-level", APP_DRIVER_FAST_POLL, extra).await;
    let job = TestJob::app_counter(cts.dir.path(), &[]);
    job.start(&cts.register(gid, job.pid).await);
    job.wait_for_values(2).await;
    System {
        gcs,
        cts,
        job,
        gid: gid.to_string(),
    }
}

async fn bench_tls(opts: Options) -> Vec<Row> {
    let database_url = integration_tests::db::fresh_database_url().await;
    let secure = system(false, &database_url).await;
    let plain = system(true, &database_url).await;
    let systems = [&secure, &plain];
    let mut rows = Vec::new();

    // Registration throughput: clients registering records of their jobs over SOAP, as CTSes
    // do (connections reused, as the CTS's client does).
    // Record IDs are unique across every measurement (one database).
    let next = Arc::new(AtomicU64::new(0));
    for clients in [1usize, 8] {
        let mut jobs = Vec::new();
        for (k, sys) in systems.iter().enumerate() {
            let mut mine = Vec::new();
            for c in 0..clients {
                let gid = format!("bench-tls-reg-{k}-{clients}-{c}");
                sys.gcs.register_job(&gid, &sys.cts.name).await;
                mine.push(gid);
            }
            jobs.push(mine);
        }
        let window = opts.window();
        let label = format!("tls register, {clients} client(s)");
        let s = interleaved(&opts, &label, 2, |v| {
            let sys = systems[v];
            let gids = jobs[v].clone();
            let next = next.clone();
            let soap = SoapClient::new(
                integration_tests::http_as(&integration_tests::pki::cts(&sys.cts.name)),
                sys.gcs.endpoint(),
            );
            let base = sys.cts.url.clone();
            let cts_name = sys.cts.name.clone();
            let signed = v == 0;
            async move {
                let start = Instant::now();
                let deadline = start + window;
                let tasks: Vec<_> = gids
                    .into_iter()
                    .map(|gid| {
                        let (soap, next, base, cts_name) =
                            (soap.clone(), next.clone(), base.clone(), cts_name.clone());
                        tokio::spawn(async move {
                            let mut n = 0u64;
                            while Instant::now() < deadline {
                                let id =
                                    format!("bench-tls-{}", next.fetch_add(1, Ordering::Relaxed));
                                let mut r = integration_tests::checkpoint_record_at(
                                    &id, &gid, &cts_name, &base,
                                );
                                r.cts_type = "app-level".into();
                                let r = if signed {
                                    integration_tests::signed(r)
                                } else {
                                    CheckpointRecord {
                                        signature: None,
                                        ..r
                                    }
                                };
                                soap.call::<RegisterCheckpointOp>(&RegisterCheckpoint {
                                    checkpoint: r,
                                })
                                .await
                                .expect("RegisterCheckpoint");
                                n += 1;
                            }
                            n
                        })
                    })
                    .collect();
                let mut ops = 0;
                for t in tasks {
                    ops += t.await.expect("a client");
                }
                start.elapsed().as_secs_f64() / ops as f64
            }
        })
        .await;
        rows.push(Row {
            bench: "tls",
            measurement: format!(
                "RegisterCheckpoint over SOAP with mutual TLS and a verified record signature, {clients} client(s)"
            ),
            baseline: "the same over plain HTTP to a GCS in insecure mode (no identities, no signature)".into(),
            unit: Unit::OpsPerSec,
            subject: s[0].clone(),
            base: s[1].clone(),
            note: "target: at most 1.15× the time per registration".into(),
        });
    }

    // DoCheckpoint latency through the GCS (broker → GCS → CTS → GCS), one call at a time.
    let per_rep = if opts.quick { 5 } else { 20 };
    let s = interleaved(&opts, "tls routing", 2, |v| {
        let sys = systems[v];
        async move {
            let req = DoCheckpoint {
                gid: sys.gid.clone(),
                stop: false,
            };
            let start = Instant::now();
            for _ in 0..per_rep {
                let r = sys
                    .gcs
                    .call::<DoCheckpointOp>(req.clone())
                    .await
                    .expect("DoCheckpoint");
                assert!(r.sequence.is_some());
            }
            start.elapsed().as_secs_f64() / per_rep as f64
        }
    })
    .await;
    for sys in systems {
        assert!(sys.job.running(), "the job survived its checkpoints");
    }
    rows.push(Row {
        bench: "tls",
        measurement: "DoCheckpoint through the GCS to the CTS with mutual TLS on both hops, the image signed and its record verified (application-level job)".into(),
        baseline: "the same system in insecure mode (plain HTTP, unsigned)".into(),
        unit: Unit::Millis,
        subject: s[0].clone(),
        base: s[1].clone(),
        note: format!("{per_rep} calls per repetition; target: at most 1.15×"),
    });
    let System { gcs, cts, job, .. } = plain;
    drop((job, cts));
    gcs.shutdown().await;
    let System { gcs, cts, job, .. } = secure;
    drop((job, cts));
    finish(gcs).await;
    rows
}

// ---------------------------------------------------------------------------------------------
// fetch: an image from one CTS to another

async fn bench_fetch(opts: Options) -> Vec<Row> {
    let gcs = TestGcs::start().await;
    let src = TestCts::registered(&gcs, "bench-src", "app-level", APP_DRIVER, "").await;
    let dst = TestCts::registered(&gcs, "bench-dst", "app-level", APP_DRIVER, "").await;
    let id = "bench-src-20260101T000000Z-0123456789ab";
    let total = opts.image_mib << 20;
    let chunked = make_image(src.cts.store(), id, total, false).await;
    assert!(chunked.is_chunked());
    // The same bytes as whole files (format 1), for the baselines: a plain download of files.
    let whole_id = "bench-src-20260101T000000Z-0123456789ab-whole";
    let manifest = make_image(src.cts.store(), whole_id, total, true).await;
    let image = ImageId::parse(id).expect("an image ID");
    let digest = src.cts.store().digest(&image).await.expect("digest");
    let src_dir = src.image_dir(whole_id);
    let images_url = format!("{}/images", src.url);
    let source = format!("{images_url}/{id}");
    // The destination CTS takes the source and digest from the GCS's record, as in a recovery.
    let gid = "bench-fetch";
    gcs.call::<RegisterJobOp>(RegisterJob {
        gid: gid.into(),
        cts_instance: "bench-src".into(),
        local_id: None,
        recovery: false,
        from_checkpoint: None,
        state: None,
        retention: None,
    })
    .await
    .expect("register the job");
    gcs.call::<RegisterCheckpointOp>(RegisterCheckpoint {
        checkpoint: integration_tests::signed(CheckpointRecord {
            id: id.into(),
            gid: gid.into(),
            sequence: None,
            cts_name: "bench-src".into(),
            cts_type: "app-level".into(),
            taken_at: Utc::now(),
            image_name: source.clone(),
            execution_manager: "https://node-bench-src/wsrf/services/ManagedJobFactoryService"
                .into(),
            size_bytes: Some(total as i64),
            digest: Some(digest.clone()),
            parent: None,
            origin: Origin::External,
            job_stopped: false,
            registered_at: None,
            image_state: ImageState::Stored,
            kept_in: None,
            image_error: None,
            owner: Some(integration_tests::current_owner()),
            signature: None,
            facts: None,
            locations: Vec::new(),
        }),
    })
    .await
    .expect("register the image's record");
    // Baselines write next to the destination store (same file system).
    let scratch = dst.dir.path().join("bench-copies");
    std::fs::create_dir_all(&scratch).expect("scratch directory");
    let mib = total as f64 / (1u64 << 20) as f64;
    let refs = (
        &dst,
        &manifest,
        &digest,
        &src_dir,
        &images_url,
        &scratch,
        &image,
    );
    // The peer certificate the source lets read the image: the CTS the GCS records the job
    // running on (`Cts::peer_may_read`); a real recovery moves the job to the destination
    // first, which this benchmark does not do.
    let peer = integration_tests::http_as("cts:bench-src");
    let peer = &peer;
    let s = interleaved(&opts, "fetch", 6, |v| {
        let (dst, manifest, digest, src_dir, images_url, scratch, image) = refs;
        async move {
            let dest = scratch.join(format!("copy-{}", uuid::Uuid::new_v4().simple()));
            let start = Instant::now();
            match v {
                0 => {
                    // What POST /v1/images/fetch does once the GCS's record is read: the
                    // verified fetch, then the restore copy (the chunks it checked are not
                    // hashed again).
                    let f = gca_store::fetch::fetch_image_report(
                        peer,
                        images_url,
                        image,
                        Some(digest),
                        dst.cts.store(),
                        &Default::default(),
                    )
                    .await
                    .expect("the store's verified fetch");
                    dst.cts
                        .store()
                        .materialize_checked(image, f.checked)
                        .await
                        .expect("the restore copy");
                }
                1 => http_download(peer, images_url, whole_id, manifest, &dest, Plain).await,
                2 => http_download(peer, images_url, whole_id, manifest, &dest, Verified).await,
                3 => local_copy(src_dir, manifest, &dest).await,
                5 => http_download(peer, images_url, whole_id, manifest, &dest, Durable).await,
                _ => {
                    let f = gca_store::fetch::fetch_image_report(
                        peer,
                        images_url,
                        image,
                        Some(digest),
                        dst.cts.store(),
                        &Default::default(),
                    )
                    .await
                    .expect("the store's verified fetch");
                    assert_eq!(f.chunks_present, 0, "into an empty store");
                }
            }
            let secs = start.elapsed().as_secs_f64();
            // Not timed: back to an empty destination.
            if v == 0 || v == 4 {
                dst.cts
                    .store()
                    .delete(image)
                    .await
                    .expect("delete the fetched copy");
            } else {
                tokio::fs::remove_dir_all(&dest)
                    .await
                    .expect("remove a copy");
            }
            secs / mib
        }
    })
    .await;
    let files = manifest.files.len();
    let what = format!("{} MiB image, {files} files", opts.image_mib);
    let fetch = format!(
        "verified fetch CTS → CTS and the restore copy ({what}; what POST /v1/images/fetch \
         does: chunks fetched, checked, stored, then files made from them, each chunk checked once)"
    );
    let store_fetch = format!(
        "verified chunk fetch into the destination's store ({} MiB image in {} chunks; \
         gca_store::fetch into an empty store, no restore copy)",
        opts.image_mib,
        chunked.chunk_set().len()
    );
    let rows = vec![
        Row {
            bench: "fetch",
            measurement: store_fetch.clone(),
            baseline: "plain HTTP GET of the same bytes (the whole-file copy of the image) from \
                       the source CTS, written to disk (no hashing, no fsync)"
                .into(),
            unit: Unit::MibPerSec,
            subject: s[4].clone(),
            base: s[1].clone(),
            note: String::new(),
        },
        Row {
            bench: "fetch",
            measurement: store_fetch.clone(),
            baseline: "plain HTTP GET of the same bytes written to disk and fsynced (durable \
                       as the fetch is), no hashing"
                .into(),
            unit: Unit::MibPerSec,
            subject: s[4].clone(),
            base: s[5].clone(),
            note: String::new(),
        },
        Row {
            bench: "fetch",
            measurement: store_fetch,
            baseline: "one-pass verified download: HTTP GET + SHA-256 while writing + fsync".into(),
            unit: Unit::MibPerSec,
            subject: s[4].clone(),
            base: s[2].clone(),
            note: String::new(),
        },
        Row {
            bench: "fetch",
            measurement: fetch.clone(),
            baseline: "plain HTTP GET of the same files from the source CTS, written to disk \
                       (no hashing, no fsync)"
                .into(),
            unit: Unit::MibPerSec,
            subject: s[0].clone(),
            base: s[1].clone(),
            note: String::new(),
        },
        Row {
            bench: "fetch",
            measurement: fetch.clone(),
            baseline: "one-pass verified download: HTTP GET + SHA-256 while writing + fsync".into(),
            unit: Unit::MibPerSec,
            subject: s[0].clone(),
            base: s[2].clone(),
            note: String::new(),
        },
        Row {
            bench: "fetch",
            measurement: fetch,
            baseline: "local copy of the image's files (std::fs::copy, source in page cache)"
                .into(),
            unit: Unit::MibPerSec,
            subject: s[0].clone(),
            base: s[3].clone(),
            note: String::new(),
        },
    ];
    drop(src);
    drop(dst);
    finish(gcs).await;
    rows
}

/// Commits an image of `total` bytes of pseudo-random data into `store`, laid out like a CRIU
/// dump: one large pages file and a dozen small ones.
async fn make_image(store: &ImageStore, id: &str, total: u64, whole_files: bool) -> Manifest {
    let staging = store
        .stage(&ImageId::parse(id).expect("an image ID"))
        .await
        .expect("stage the image");
    let dir = staging.dir.clone();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        const SMALL: u64 = 64 * 1024;
        let smalls = 12u64.min(total / SMALL / 2);
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        let mut fill = |buf: &mut [u8]| {
            for chunk in buf.chunks_mut(8) {
                // xorshift64
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                chunk.copy_from_slice(&rng.to_le_bytes()[..chunk.len()]);
            }
        };
        let mut buf = vec![0u8; 1 << 20];
        for i in 0..smalls {
            fill(&mut buf[..SMALL as usize]);
            std::fs::write(dir.join(format!("core-{i}.img")), &buf[..SMALL as usize])
                .expect("write an image file");
        }
        let mut left = total - smalls * SMALL;
        let mut pages = std::io::BufWriter::new(
            std::fs::File::create(dir.join("pages-1.img")).expect("create the pages file"),
        );
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            fill(&mut buf[..n]);
            pages.write_all(&buf[..n]).expect("write the pages file");
            left -= n as u64;
        }
        pages.flush().expect("flush the pages file");
    })
    .await
    .expect("write the image");
    let meta = ImageMeta {
        gid: "bench-fetch".into(),
        created_at: Utc::now(),
        driver: "criu".into(),
        origin: "bench-src".into(),
        extra: [("uid", "0"), ("gid", "0")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    if whole_files {
        staging.commit_whole_files(meta).await
    } else {
        staging.commit(meta).await
    }
    .expect("commit the image")
}

/// Downloads the image's files into `dest` over HTTP from the CTS's image routes, like the
/// fetch but without retries or commit; with `verify`, also the manifest (checked against
/// nothing but parsed), a SHA-256 of every file while it is written, and an fsync of every
/// file and of `dest`.
/// What a baseline download does besides writing the bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Download {
    /// Nothing: left in the page cache.
    Plain,
    /// fsync of each file and of the directory.
    Durable,
    /// The manifest read and parsed, SHA-256 of each file checked, and the fsyncs.
    Verified,
}
use Download::{Durable, Plain, Verified};

async fn http_download(
    http: &reqwest::Client,
    images_url: &str,
    id: &str,
    manifest: &Manifest,
    dest: &Path,
    mode: Download,
) {
    let (verify, sync) = (mode == Verified, mode != Plain);
    tokio::fs::create_dir_all(dest).await.expect("create dest");
    if verify {
        let bytes = http
            .get(format!("{images_url}/{id}"))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .expect("GET the manifest")
            .bytes()
            .await
            .expect("read the manifest");
        Manifest::parse(&bytes).expect("a valid manifest");
    }
    for f in &manifest.files {
        let path = dest.join(&f.path);
        let file = tokio::fs::File::create(&path).await.expect("create a file");
        let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
        let mut hasher = Sha256::new();
        let res = http
            .get(format!("{images_url}/{id}/files/{}", f.path))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .expect("GET a file");
        let mut stream = res.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.expect("read a file");
            out.write_all(&chunk).await.expect("write a file");
            if verify {
                hasher.update(&chunk);
            }
        }
        out.flush().await.expect("flush a file");
        if verify {
            assert_eq!(
                Some(format!("{:x}", hasher.finalize())),
                f.sha256,
                "{}",
                f.path
            );
        }
        if sync {
            out.get_ref().sync_all().await.expect("fsync a file");
        }
    }
    if sync {
        let dir = dest.to_path_buf();
        tokio::task::spawn_blocking(move || std::fs::File::open(dir)?.sync_all())
            .await
            .expect("fsync task")
            .expect("fsync the directory");
    }
}

async fn local_copy(src: &Path, manifest: &Manifest, dest: &Path) {
    let (src, dest) = (src.to_path_buf(), dest.to_path_buf());
    let files: Vec<String> = manifest.files.iter().map(|f| f.path.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&dest)?;
        for f in files {
            std::fs::copy(src.join(&f), dest.join(&f))?;
        }
        std::io::Result::Ok(())
    })
    .await
    .expect("copy task")
    .expect("copy the image");
}

// ---------------------------------------------------------------------------------------------
// criu: a CRIU checkpoint through the CTS, or `criu dump` by hand

async fn bench_criu(opts: Options) -> Vec<Row> {
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(&gcs, "bench-criu", "criu", CRIU_DRIVER, "").await;
    let gid = "bench-criu";
    let job = big_job(cts.dir.path()).await;
    cts.register(gid, job.pid).await;
    let criu = gca_drivers::criu::find_criu();
    // The options the CTS's driver passes (cts/src/driver/criu.rs), from its configuration.
    let cfg = gca_protocol::driver_config::CriuConfig::default();
    let scratch = cts.dir.path().join("direct-dumps");
    std::fs::create_dir_all(&scratch).expect("scratch directory");
    let per_rep = if opts.quick { 1 } else { 5 };
    let req = DoCheckpoint {
        gid: gid.into(),
        stop: false,
    };
    let cts_bytes = AtomicU64::new(0);
    let direct_bytes = AtomicU64::new(0);
    let refs = (
        &cts,
        &req,
        &criu,
        &cfg,
        &scratch,
        &cts_bytes,
        &direct_bytes,
        job.pid,
    );
    // The image the steady-state variant keeps between its checkpoints (as a periodic
    // checkpoint does: the previous image is still stored).
    let kept: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
    let kept = &kept;
    let s = interleaved(&opts, "criu", 3, |v| {
        let (cts, req, criu, cfg, scratch, cts_bytes, direct_bytes, pid) = refs;
        async move {
            let store = cts.cts.store();
            let delete = |id: String| async move {
                store
                    .delete(&ImageId::parse(&id).expect("an image ID"))
                    .await
                    .expect("delete the image");
            };
            let checkpoint = || async {
                let r = cts
                    .soap
                    .call::<CtsDoCheckpointOp>(req)
                    .await
                    .expect("a CRIU checkpoint through the CTS");
                assert!(r.sequence.is_some(), "the GCS numbered the checkpoint");
                r
            };
            let mut secs = 0.0;
            for _ in 0..per_rep {
                if v == 0 || v == 2 {
                    let previous = kept.lock().unwrap().take();
                    match (v, previous) {
                        // Steady state: a previous image is in the store.
                        (0, Some(p)) => *kept.lock().unwrap() = Some(p),
                        (0, None) => *kept.lock().unwrap() = Some(checkpoint().await.id),
                        // Into an empty store (its chunks swept with it).
                        (_, Some(p)) => delete(p).await,
                        (_, None) => {}
                    }
                    let start = Instant::now();
                    let r = checkpoint().await;
                    secs += start.elapsed().as_secs_f64();
                    cts_bytes.store(r.size_bytes.unwrap_or(0) as u64, Ordering::Relaxed);
                    if v == 0 {
                        let old = kept.lock().unwrap().replace(r.id);
                        if let Some(old) = old {
                            delete(old).await;
                        }
                    } else {
                        delete(r.id).await;
                    }
                } else {
                    let dir = scratch.join(uuid::Uuid::new_v4().simple().to_string());
                    std::fs::create_dir(&dir).expect("dump directory");
                    let d = dir.to_string_lossy().into_owned();
                    let mut args: Vec<String> = vec![
                        "dump".into(),
                        "-t".into(),
                        pid.to_string(),
                        "-D".into(),
                        d.clone(),
                        "-W".into(),
                        d,
                        "-o".into(),
                        "dump.log".into(),
                        format!("-v{}", cfg.log_level),
                        "--leave-running".into(),
                    ];
                    if cfg.shell_job {
                        args.push("--shell-job".into());
                    }
                    if cfg.tcp_established {
                        args.push("--tcp-established".into());
                    }
                    if cfg.file_locks {
                        args.push("--file-locks".into());
                    }
                    let start = Instant::now();
                    let out = tokio::process::Command::new(criu)
                        .args(&args)
                        .env("LC_ALL", "C")
                        .stdin(std::process::Stdio::null())
                        .output()
                        .await
                        .expect("run criu");
                    secs += start.elapsed().as_secs_f64();
                    assert!(
                        out.status.success(),
                        "criu dump failed: {}; log in {}",
                        String::from_utf8_lossy(&out.stderr),
                        dir.display()
                    );
                    direct_bytes.store(dir_bytes(&dir), Ordering::Relaxed);
                    std::fs::remove_dir_all(&dir).expect("remove the dump");
                }
            }
            secs / per_rep as f64
        }
    })
    .await;
    assert!(job.running(), "the job survived its checkpoints");
    let baseline = format!(
        "criu dump run directly with the driver's options on the same process ({} per \
         repetition each)",
        per_rep
    );
    let note = format!(
        "bash job holding 64 MiB of random text; images: {} KiB through the CTS, {} KiB direct",
        cts_bytes.load(Ordering::Relaxed) / 1024,
        direct_bytes.load(Ordering::Relaxed) / 1024
    );
    let rows = vec![
        Row {
            bench: "criu",
            measurement: "CRIU checkpoint through the CTS, steady state (SOAP DoCheckpoint: criu \
                          dump, chunks cut and hashed in parallel, only new chunks written and \
                          fsynced, manifest, record at the GCS; the previous image stored)"
                .into(),
            baseline: baseline.clone(),
            unit: Unit::Millis,
            subject: s[0].clone(),
            base: s[1].clone(),
            note: note.clone(),
        },
        Row {
            bench: "criu",
            measurement: "CRIU checkpoint through the CTS into an empty store (every chunk new: \
                          written and fsynced)"
                .into(),
            baseline,
            unit: Unit::Millis,
            subject: s[2].clone(),
            base: s[1].clone(),
            note,
        },
    ];
    drop(job);
    drop(cts);
    finish(gcs).await;
    rows
}

// ---------------------------------------------------------------------------------------------
// vmm: a VM checkpoint through the CTS, or QMP's own save of the same VM

async fn bench_vmm(opts: Options) -> Vec<Row> {
    use gca_drivers::vmm::launch::{self, Boot};
    use gca_drivers::vmm::qmp::Qmp;
    use serde_json::json;
    let gcs = TestGcs::start().await;
    let driver = integration_tests::cts::vmm_driver();
    let cts = TestCts::registered(&gcs, "bench-vmm", "vmm", &driver, "").await;
    let gid = "bench-vmm";
    // This process is the job's (as gca-vmm-exec is): QEMU is its child.
    let registered = cts.register(gid, std::process::id() as i32).await;
    let run_dir = registered.checkpoint_dir.clone();
    let cfg: gca_protocol::driver_config::VmmConfig = {
        let t: toml::Table = driver.parse().expect("driver table");
        let mut t = t;
        t.remove("kind");
        t.try_into().expect("a VMM configuration")
    };
    let job = [
        "sh".to_string(),
        "-c".into(),
        "n=0; while :; do n=$((n+1)); echo \"count $n\"; echo $n >> count.log; sleep 0.1; done"
            .into(),
    ];
    launch::make_job_disk(&cfg, &run_dir, None, &job).expect("the job's disk");
    let me = std::process::id() as i32;
    let (uid, gidn) = (
        gca_drivers::proc::uid(me).expect("our UID"),
        gca_drivers::proc::gid(me).expect("our GID"),
    );
    let mut qemu =
        launch::spawn(&cfg, &run_dir, Boot::Fresh { uid, gid: gidn }).expect("start QEMU");
    // The gate waits for its host: hold the connection.
    let gate_path = run_dir.join(launch::GATE_SOCKET);
    let deadline = Instant::now() + Duration::from_secs(cfg.boot_timeout_secs);
    let _gate = loop {
        match std::os::unix::net::UnixStream::connect(&gate_path) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("the VM's gate socket: {e}"),
        }
    };
    let console = run_dir.join(launch::CONSOLE_LOG);
    let boot = Instant::now();
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("count 3")
    {
        assert!(
            boot.elapsed() < Duration::from_secs(cfg.boot_timeout_secs),
            "the job in the VM does not count"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let scratch = cts.dir.path().join("qmp-saves");
    std::fs::create_dir_all(&scratch).expect("scratch directory");
    let req = DoCheckpoint {
        gid: gid.into(),
        stop: false,
    };
    let cts_bytes = AtomicU64::new(0);
    let direct_bytes = AtomicU64::new(0);
    let refs = (&cts, &req, &run_dir, &scratch, &cts_bytes, &direct_bytes);
    let s = interleaved(&opts, "vmm", 2, |v| {
        let (cts, req, run_dir, scratch, cts_bytes, direct_bytes) = refs;
        async move {
            if v == 0 {
                let start = Instant::now();
                let r = cts
                    .soap
                    .call::<CtsDoCheckpointOp>(req)
                    .await
                    .expect("a VM checkpoint through the CTS");
                let secs = start.elapsed().as_secs_f64();
                assert!(r.sequence.is_some(), "the GCS numbered the checkpoint");
                cts_bytes.store(r.size_bytes.unwrap_or(0) as u64, Ordering::Relaxed);
                cts.cts
                    .store()
                    .delete(&ImageId::parse(&r.id).expect("an image ID"))
                    .await
                    .expect("delete the image");
                secs
            } else {
                let dir = scratch.join(uuid::Uuid::new_v4().simple().to_string());
                std::fs::create_dir(&dir).expect("save directory");
                let (qmp, d) = (run_dir.join(launch::QMP_SOCKET), dir.clone());
                let secs = tokio::task::spawn_blocking(move || {
                    let start = Instant::now();
                    let mut q =
                        Qmp::connect_waiting(&qmp, Instant::now() + Duration::from_secs(300))
                            .expect("QMP");
                    let run = |q: &mut Qmp, c: &str, a: serde_json::Value| {
                        q.execute(c, Some(a)).unwrap_or_else(|e| panic!("{c}: {e}"))
                    };
                    q.execute("stop", None).expect("stop");
                    run(
                        &mut q,
                        "migrate-set-parameters",
                        json!({ "max-bandwidth": 1_i64 << 40 }),
                    );
                    run(
                        &mut q,
                        "drive-backup",
                        json!({
                            "job-id": "bench-save", "device": launch::DISK_NODE,
                            "target": d.join("disk.qcow2").display().to_string(),
                            "format": "qcow2", "sync": "full", "auto-dismiss": false,
                        }),
                    );
                    q.wait_job("bench-save").expect("drive-backup");
                    run(
                        &mut q,
                        "migrate",
                        json!({
                            "uri": format!("exec:cat > {}", d.join("machine.state").display()),
                        }),
                    );
                    q.wait_migration().expect("migrate");
                    q.execute("cont", None).expect("cont");
                    start.elapsed().as_secs_f64()
                })
                .await
                .expect("the QMP save");
                direct_bytes.store(dir_bytes(&dir), Ordering::Relaxed);
                std::fs::remove_dir_all(&dir).expect("remove the save");
                secs
            }
        }
    })
    .await;
    assert!(
        qemu.try_wait().expect("QEMU").is_none(),
        "the VM survived its checkpoints"
    );
    let rows = vec![Row {
        bench: "vmm",
        measurement: "VM checkpoint through the CTS (SOAP DoCheckpoint: QMP stop, \
                      blockdev-backup and migrate into descriptors, cont; manifest with SHA-256, \
                      fsync, store, record at the GCS)"
            .into(),
        baseline: "QMP's own save of the same VM (stop, drive-backup to a qcow2, migrate to \
                   exec:cat > file, cont)"
            .into(),
        unit: Unit::Millis,
        subject: s[0].clone(),
        base: s[1].clone(),
        note: format!(
            "{} MiB guest, {} accel, counting job; images: {} KiB through the CTS, {} KiB direct",
            cfg.memory_mib,
            cfg.accel,
            cts_bytes.load(Ordering::Relaxed) / 1024,
            direct_bytes.load(Ordering::Relaxed) / 1024
        ),
    }];
    let _ = qemu.kill();
    let _ = qemu.wait();
    drop(cts);
    finish(gcs).await;
    rows
}

/// A bash job holding 64 MiB of random text (base64 of 48 MB) that then counts in a loop
/// (a few pages change between checkpoints); returns once the text is in its memory.
async fn big_job(dir: &Path) -> TestJob {
    let ready = dir.join(format!("big-ready-{}", uuid::Uuid::new_v4().simple()));
    let job = TestJob::script(
        dir,
        &format!(
            "big=$(head -c 48000000 /dev/urandom | base64 -w0); : > {ready:?}; i=0; \
             while :; do i=$((i+1)); sleep 0.05; done"
        ),
        &[],
    );
    let start = Instant::now();
    while !ready.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the big job did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    job
}

// ---------------------------------------------------------------------------------------------
// dedup: the bytes 8 checkpoints of one job take in the store

async fn bench_dedup(opts: Options) -> Vec<Row> {
    let gcs = TestGcs::start().await;
    let cts = TestCts::registered(&gcs, "bench-dedup", "criu", CRIU_DRIVER, "").await;
    let gid = "bench-dedup";
    let job = big_job(cts.dir.path()).await;
    cts.register(gid, job.pid).await;
    let req = DoCheckpoint {
        gid: gid.into(),
        stop: false,
    };
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let (mut subject, mut base, mut logical) = (vec![], vec![], 0u64);
    let reps = if opts.quick { 1 } else { 3 };
    for _ in 0..reps {
        let mut ids = Vec::new();
        let mut one = 0u64;
        for i in 0..8 {
            let r = cts
                .soap
                .call::<CtsDoCheckpointOp>(&req)
                .await
                .expect("a CRIU checkpoint through the CTS");
            if i == 0 {
                one = cts.stored_chunks().1;
                logical = r.size_bytes.unwrap_or(0) as u64;
            }
            ids.push(r.id);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        subject.push(mib(cts.stored_chunks().1));
        base.push(mib(one));
        for id in ids {
            cts.cts
                .store()
                .delete(&ImageId::parse(&id).expect("an image ID"))
                .await
                .expect("delete the image");
        }
        assert_eq!(cts.stored_chunks().0, 0, "the sweep removed every chunk");
    }
    drop(job);
    drop(cts);
    finish(gcs).await;
    vec![Row {
        bench: "dedup",
        measurement: "store bytes (chunks) after 8 CRIU checkpoints of a job holding 64 MiB, \
                      a counter running between them"
            .into(),
        baseline: "store bytes after the first of them (one image)".into(),
        unit: Unit::Mib,
        subject,
        base,
        note: format!(
            "one image is {:.1} MiB of CRIU files; 8 whole images (format 1) would take {:.1} MiB",
            mib(logical),
            8.0 * mib(logical)
        ),
    }]
}

// ---------------------------------------------------------------------------------------------
// hash: which hash names chunks

async fn bench_hash(opts: Options) -> Vec<Row> {
    tokio::task::spawn_blocking(move || {
        let len = 64usize << 20;
        let mut data = vec![0u8; len];
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for c in data.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
        }
        let mib = (len >> 20) as f64;
        let mut samples = vec![Vec::new(); 4];
        for rep in 0..opts.warmup + opts.reps {
            for v in order(rep, 4) {
                let start = Instant::now();
                match v {
                    0 => {
                        std::hint::black_box(Sha256::digest(&data));
                    }
                    1 => {
                        std::hint::black_box(blake3::hash(&data));
                    }
                    2 => {
                        let mut h = blake3::Hasher::new();
                        h.update_rayon(&data);
                        std::hint::black_box(h.finalize());
                    }
                    _ => {
                        // What the store does per 8 MiB segment: FastCDC, BLAKE3 per chunk.
                        for seg in data.chunks(8 << 20) {
                            for c in
                                fastcdc::v2020::FastCDC::new(seg, 16 << 10, 64 << 10, 256 << 10)
                            {
                                std::hint::black_box(blake3::hash(
                                    &seg[c.offset..c.offset + c.length],
                                ));
                            }
                        }
                    }
                }
                if rep >= opts.warmup {
                    samples[v].push(start.elapsed().as_secs_f64() / mib);
                }
            }
        }
        let sha = "SHA-256 of the same 64 MiB (sha2 0.10, one thread)".to_string();
        let row = |m: &str, v: usize| Row {
            bench: "hash",
            measurement: m.into(),
            baseline: sha.clone(),
            unit: Unit::MibPerSec,
            subject: samples[v].clone(),
            base: samples[0].clone(),
            note: String::new(),
        };
        vec![
            row("BLAKE3, one thread", 1),
            row("BLAKE3, all threads (rayon)", 2),
            row(
                "FastCDC 2020 cut (16/64/256 KiB) + BLAKE3 per chunk, one thread",
                3,
            ),
        ]
    })
    .await
    .expect("hash benchmark")
}

/// The bytes of the files in `dir` (one level, as CRIU writes it).
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
