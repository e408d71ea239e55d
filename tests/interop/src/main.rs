//! The seed's public types, declared with the seed's serde attributes, as a
//! filter for checking the Python library's JSON against real serde.
//!
//! `serde-interop` (no arguments) reads lines `<Type>\t<json>` on stdin and,
//! for each, parses the JSON as that type and prints `ok\t<serde's JSON of
//! it>`, or `err\t<serde's error>`. `serde-interop samples` prints values built
//! in Rust, with nanosecond and edge values, as lines `<label>\t<Type>\t<json>`.

use std::collections::HashMap;
use std::io::{self, BufRead, Write};
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

// ---- the seed's types, exactly as declared there ----------------------------

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecutionRequest {
    pub id: Uuid,
    pub command: Command,
    pub env: HashMap<String, String>,
    pub working_dir: Option<PathBuf>,
    pub timeout_ms: Option<u64>,
    pub metadata: ExecutionMetadata,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecutionPlan {
    pub id: Uuid,
    pub description: String,
    pub strategy: ExecutionStrategy,
    pub commands: Vec<ExecutionRequest>,
    pub metadata: ExecutionMetadata,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    Script { path: PathBuf, interpreter: Option<String> },
    Exec { program: String, args: Vec<String> },
    Shell { command: String, shell: String },
    AwsCli { service: String, operation: String, args: Vec<String>, profile: Option<String>, region: Option<String> },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecutionStrategy {
    Serial { stop_on_error: bool },
    Parallel { max_concurrency: Option<usize> },
    DependencyGraph { dependencies: HashMap<usize, Vec<usize>> },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecutionResult {
    pub id: Uuid,
    pub status: ExecutionStatus,
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    pub duration: Duration,
    pub started_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    pub log_path: PathBuf,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanExecutionResult {
    pub plan_id: Uuid,
    pub status: ExecutionStatus,
    pub results: Vec<ExecutionResult>,
    pub total_duration: Duration,
    pub stats: ExecutionStats,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ExecutionStatus {
    Pending,
    Running,
    Completed,
    Failed,
    Cancelled,
    Timeout,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event_type", rename_all = "snake_case")]
pub enum ExecutionEvent {
    Started { execution_id: Uuid, command: String, timestamp: DateTime<Utc> },
    Stdout { execution_id: Uuid, line: String, timestamp: DateTime<Utc> },
    Stderr { execution_id: Uuid, line: String, timestamp: DateTime<Utc> },
    Completed { execution_id: Uuid, result: ExecutionResult, timestamp: DateTime<Utc> },
    Failed { execution_id: Uuid, error: String, timestamp: DateTime<Utc> },
    Cancelled { execution_id: Uuid, timestamp: DateTime<Utc> },
    Progress { plan_id: Uuid, completed: usize, total: usize, current_command: Option<String>, timestamp: DateTime<Utc> },
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ExecutionMetadata {
    pub source: Option<String>,
    pub conversation_id: Option<Uuid>,
    pub tags: HashMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecutionSummary {
    pub id: Uuid,
    pub status: ExecutionStatus,
    pub started_at: DateTime<Utc>,
    pub duration: Option<Duration>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecutionStats {
    pub total: usize,
    pub completed: usize,
    pub failed: usize,
    pub cancelled: usize,
    pub timeout: usize,
}

/// `DependencyGraph`'s field outside the internally tagged enum, where serde
/// can read integer map keys (inside it cannot: serde-rs/serde#1183).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DependencyMap {
    pub dependencies: HashMap<usize, Vec<usize>>,
}

// ---- the filter ---------------------------------------------------------------

fn again<T: DeserializeOwned + Serialize>(json: &str) -> Result<String, String> {
    let value: T = serde_json::from_str(json).map_err(|e| e.to_string())?;
    serde_json::to_string(&value).map_err(|e| e.to_string())
}

fn reserialize(type_name: &str, json: &str) -> Result<String, String> {
    match type_name {
        "Command" => again::<Command>(json),
        "ExecutionStrategy" => again::<ExecutionStrategy>(json),
        "ExecutionRequest" => again::<ExecutionRequest>(json),
        "ExecutionPlan" => again::<ExecutionPlan>(json),
        "ExecutionResult" => again::<ExecutionResult>(json),
        "PlanExecutionResult" => again::<PlanExecutionResult>(json),
        "ExecutionStatus" => again::<ExecutionStatus>(json),
        "ExecutionEvent" => again::<ExecutionEvent>(json),
        "ExecutionMetadata" => again::<ExecutionMetadata>(json),
        "ExecutionSummary" => again::<ExecutionSummary>(json),
        "ExecutionStats" => again::<ExecutionStats>(json),
        "DependencyMap" => again::<DependencyMap>(json),
        "Duration" => again::<Duration>(json),
        "DateTime" => again::<DateTime<Utc>>(json),
        other => Err(format!("unknown type {other}")),
    }
}

fn filter() -> io::Result<()> {
    let stdin = io::stdin();
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    for line in stdin.lock().lines() {
        let line = line?;
        let (type_name, json) = line.split_once('\t').unwrap_or((line.as_str(), ""));
        match reserialize(type_name, json) {
            Ok(text) => writeln!(out, "ok\t{text}")?,
            Err(message) => writeln!(out, "err\t{}", message.replace('\n', " "))?,
        }
    }
    out.flush()
}

// ---- samples built in Rust ------------------------------------------------------

fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32, nano: u32) -> DateTime<Utc> {
    let naive = NaiveDate::from_ymd_opt(y, mo, d).unwrap().and_hms_nano_opt(h, mi, s, nano).unwrap();
    Utc.from_utc_datetime(&naive)
}

fn id(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

fn result(n: u128, duration: Duration, started_at: DateTime<Utc>) -> ExecutionResult {
    ExecutionResult {
        id: id(n),
        status: ExecutionStatus::Completed,
        exit_code: 0,
        stdout: "ok\n".to_string(),
        stderr: String::new(),
        duration,
        started_at,
        completed_at: Some(started_at + chrono::Duration::milliseconds(1500)),
        log_path: PathBuf::from("/tmp/cloudops/x.log"),
        error: None,
    }
}

fn request(n: u128, command: Command) -> ExecutionRequest {
    ExecutionRequest {
        id: id(n),
        command,
        env: HashMap::new(),
        working_dir: None,
        timeout_ms: None,
        metadata: ExecutionMetadata::default(),
    }
}

fn samples() -> Vec<(String, &'static str, String)> {
    let mut out: Vec<(String, &'static str, String)> = Vec::new();
    fn put<T: Serialize>(out: &mut Vec<(String, &'static str, String)>, label: &str, type_name: &'static str, value: &T) {
        out.push((label.to_string(), type_name, serde_json::to_string(value).unwrap()));
    }
    let t0 = at(2024, 5, 1, 12, 0, 0, 0);

    let commands = [
        ("script", Command::Script { path: PathBuf::from("/tmp/deploy.sh"), interpreter: None }),
        ("script-interpreter", Command::Script { path: PathBuf::from("run.py"), interpreter: Some("python3 -u".into()) }),
        ("exec", Command::Exec { program: "python3".into(), args: vec!["script.py".into(), "--input".into(), "data.json".into()] }),
        ("exec-no-args", Command::Exec { program: "true".into(), args: vec![] }),
        ("shell", Command::Shell { command: "aws ec2 describe-instances | jq '.Reservations[]'".into(), shell: "bash".into() }),
        ("aws-cli", Command::AwsCli { service: "ec2".into(), operation: "describe-instances".into(), args: vec!["--output".into(), "json".into()], profile: Some("prod".into()), region: Some("us-west-2".into()) }),
        ("aws-cli-bare", Command::AwsCli { service: "s3".into(), operation: "ls".into(), args: vec![], profile: None, region: None }),
        ("text-escapes", Command::Exec { program: "printf".into(), args: vec!["é✓🚀".into(), "\u{1}\u{1f}\t\n\r\"\\/".into(), "\u{7f}\u{2028}".into(), String::new()] }),
    ];
    for (label, command) in &commands {
        put(&mut out, &format!("command-{label}"), "Command", command);
    }

    let strategies = [
        ("serial", ExecutionStrategy::Serial { stop_on_error: true }),
        ("serial-continue", ExecutionStrategy::Serial { stop_on_error: false }),
        ("parallel-unlimited", ExecutionStrategy::Parallel { max_concurrency: None }),
        ("parallel-4", ExecutionStrategy::Parallel { max_concurrency: Some(4) }),
        ("parallel-usize-max", ExecutionStrategy::Parallel { max_concurrency: Some(usize::MAX) }),
        ("graph-empty", ExecutionStrategy::DependencyGraph { dependencies: HashMap::new() }),
        ("graph", ExecutionStrategy::DependencyGraph { dependencies: HashMap::from([(2, vec![0, 1])]) }),
    ];
    for (label, strategy) in &strategies {
        put(&mut out, &format!("strategy-{label}"), "ExecutionStrategy", strategy);
    }

    for (label, status) in [
        ("pending", ExecutionStatus::Pending),
        ("running", ExecutionStatus::Running),
        ("completed", ExecutionStatus::Completed),
        ("failed", ExecutionStatus::Failed),
        ("cancelled", ExecutionStatus::Cancelled),
        ("timeout", ExecutionStatus::Timeout),
    ] {
        put(&mut out, &format!("status-{label}"), "ExecutionStatus", &status);
    }

    let metadata = ExecutionMetadata {
        source: Some("server".into()),
        conversation_id: Some(id(0xabc)),
        tags: HashMap::from([("team".to_string(), "ops".to_string())]),
    };
    put(&mut out, "metadata-default", "ExecutionMetadata", &ExecutionMetadata::default());
    put(&mut out, "metadata-full", "ExecutionMetadata", &metadata);

    for (n, (label, command)) in commands.iter().enumerate() {
        put(&mut out, &format!("request-{label}"), "ExecutionRequest", &request(n as u128 + 1, command.clone()));
    }
    let mut full = request(100, commands[2].1.clone());
    full.env = HashMap::from([("A".to_string(), "1 2".to_string())]);
    full.working_dir = Some(PathBuf::from("/srv/app"));
    full.timeout_ms = Some(5000);
    full.metadata = metadata.clone();
    put(&mut out, "request-env-cwd-timeout", "ExecutionRequest", &full);
    for (label, timeout) in [("timeout-0", 0u64), ("timeout-u64-max", u64::MAX)] {
        let mut edge = request(101, commands[3].1.clone());
        edge.timeout_ms = Some(timeout);
        put(&mut out, &format!("request-{label}"), "ExecutionRequest", &edge);
    }

    for (n, (label, strategy)) in strategies.iter().enumerate() {
        let plan = ExecutionPlan {
            id: id(200 + n as u128),
            description: format!("plan {label}"),
            strategy: strategy.clone(),
            commands: vec![request(300, commands[3].1.clone()), request(301, commands[4].1.clone()), request(302, commands[0].1.clone())],
            metadata: ExecutionMetadata::default(),
        };
        put(&mut out, &format!("plan-{label}"), "ExecutionPlan", &plan);
    }

    let durations = [
        ("zero", Duration::new(0, 0)),
        ("millis", Duration::new(2, 250_000_000)),
        ("micros", Duration::new(1, 123_456_000)),
        ("nanos", Duration::new(1, 123_456_789)),
        ("one-nano", Duration::new(0, 1)),
        ("just-below-a-second", Duration::new(0, 999_999_999)),
        ("largest-timedelta", Duration::new(86_399_999_999_999, 999_999_999)),
        ("u64-max-secs", Duration::new(u64::MAX, 999_999_999)),
    ];
    for (label, duration) in &durations {
        put(&mut out, &format!("duration-{label}"), "Duration", duration);
        put(&mut out, &format!("result-duration-{label}"), "ExecutionResult", &result(400, *duration, t0));
    }

    let stamps = [
        ("whole-second", t0),
        ("millis", at(2024, 5, 1, 12, 0, 0, 250_000_000)),
        ("micros", at(2024, 5, 1, 12, 0, 0, 123_456_000)),
        ("nanos", at(2024, 5, 1, 12, 0, 0, 123_456_789)),
        ("one-nano", at(2024, 5, 1, 12, 0, 0, 1)),
        ("before-epoch", at(1969, 12, 31, 23, 59, 59, 500_000_000)),
        ("year-1", at(1, 1, 1, 0, 0, 0, 0)),
        ("year-9999-last-nano", at(9999, 12, 31, 23, 59, 59, 999_999_999)),
        ("leap-second", at(2016, 12, 31, 23, 59, 59, 1_500_000_000)),
        ("year-10000", at(10000, 1, 1, 0, 0, 0, 0)),
        ("year-0", at(0, 6, 1, 0, 0, 0, 0)),
    ];
    for (n, (label, stamp)) in stamps.iter().enumerate() {
        put(&mut out, &format!("datetime-{label}"), "DateTime", stamp);
        put(
            &mut out,
            &format!("event-stdout-{label}"),
            "ExecutionEvent",
            &ExecutionEvent::Stdout { execution_id: id(500 + n as u128), line: "line".into(), timestamp: *stamp },
        );
    }

    let tn = at(2024, 5, 1, 12, 0, 0, 123_456_789);
    for (label, code) in [("exit-i32-min", i32::MIN), ("exit-i32-max", i32::MAX), ("exit-minus-1", -1)] {
        let mut r = result(600, Duration::new(0, 1), tn);
        r.exit_code = code;
        r.status = ExecutionStatus::Failed;
        r.error = Some(format!("exit {code}"));
        put(&mut out, &format!("result-{label}"), "ExecutionResult", &r);
    }
    let mut pending = result(601, Duration::new(0, 0), tn);
    pending.status = ExecutionStatus::Running;
    pending.completed_at = None;
    pending.stdout = "é✓🚀\u{0}\n".into();
    pending.stderr = "\u{1b}[31mred\u{1b}[0m".into();
    put(&mut out, "result-running-no-completion", "ExecutionResult", &pending);
    for (label, path) in [("log-path-empty", ""), ("log-path-unnormalised", "/tmp//a/./b/"), ("log-path-relative", "logs/x.log")] {
        let mut r = result(602, Duration::new(0, 5), tn);
        r.log_path = PathBuf::from(path);
        put(&mut out, &format!("result-{label}"), "ExecutionResult", &r);
    }

    let results = vec![result(700, Duration::new(1, 1), tn), result(701, Duration::new(0, 999_999_999), t0)];
    let stats = ExecutionStats { total: 2, completed: 2, failed: 0, cancelled: 0, timeout: 0 };
    put(&mut out, "stats", "ExecutionStats", &stats);
    let huge = ExecutionStats { total: usize::MAX, completed: usize::MAX, failed: 0, cancelled: 1, timeout: usize::MAX };
    put(&mut out, "stats-usize-max", "ExecutionStats", &huge);
    let plan_result = PlanExecutionResult {
        plan_id: id(800),
        status: ExecutionStatus::Completed,
        results,
        total_duration: Duration::new(3, 7),
        stats: stats.clone(),
    };
    put(&mut out, "plan-result", "PlanExecutionResult", &plan_result);

    let events = [
        ("started", ExecutionEvent::Started { execution_id: id(900), command: "ls -l".into(), timestamp: tn }),
        ("stdout", ExecutionEvent::Stdout { execution_id: id(900), line: "total 0".into(), timestamp: tn }),
        ("stderr", ExecutionEvent::Stderr { execution_id: id(900), line: "warning: é".into(), timestamp: t0 }),
        ("completed", ExecutionEvent::Completed { execution_id: id(900), result: result(900, Duration::new(0, 123_456_789), tn), timestamp: tn }),
        ("failed", ExecutionEvent::Failed { execution_id: id(901), error: "Command failed with exit code 2".into(), timestamp: tn }),
        ("cancelled", ExecutionEvent::Cancelled { execution_id: id(902), timestamp: at(2024, 5, 1, 12, 0, 0, 250_000_000) }),
        ("progress", ExecutionEvent::Progress { plan_id: id(903), completed: 1, total: 3, current_command: Some("true".into()), timestamp: tn }),
        ("progress-none", ExecutionEvent::Progress { plan_id: id(903), completed: 0, total: 0, current_command: None, timestamp: tn }),
        ("progress-usize-max", ExecutionEvent::Progress { plan_id: id(903), completed: usize::MAX, total: usize::MAX, current_command: None, timestamp: tn }),
    ];
    for (label, event) in &events {
        put(&mut out, &format!("event-{label}"), "ExecutionEvent", event);
    }

    let summaries = [
        ("running", ExecutionSummary { id: id(1000), status: ExecutionStatus::Running, started_at: tn, duration: None }),
        ("done", ExecutionSummary { id: id(1001), status: ExecutionStatus::Timeout, started_at: t0, duration: Some(Duration::new(120, 1)) }),
    ];
    for (label, summary) in &summaries {
        put(&mut out, &format!("summary-{label}"), "ExecutionSummary", summary);
    }
    put(&mut out, "dependency-map", "DependencyMap", &DependencyMap { dependencies: HashMap::from([(2, vec![0, 1])]) });
    out
}

fn main() -> io::Result<()> {
    if std::env::args().nth(1).as_deref() == Some("samples") {
        let stdout = io::stdout();
        let mut out = stdout.lock();
        for (label, type_name, json) in samples() {
            writeln!(out, "{label}\t{type_name}\t{json}")?;
        }
        return Ok(());
    }
    filter()
}
