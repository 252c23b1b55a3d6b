//! The usage log: a second access log of Envoy's front listener, written to a file in an emptyDir
//! that the gateway Pod's two containers share, one JSON object per answer ([`format`]), and
//! followed by the sidecar ([`Follower`]), which counts each line into [`UsageCounters`].
//!
//! Why a file: Envoy formats a file log's line on the worker and writes it from its own flush
//! thread, so an answer costs a line of formatting. The gRPC access-log service this replaced built
//! a protobuf entry per answer (every common property, the metadata, a custom tag, 3 headers) and
//! cost 0.07 ms of each answer, measured in pairs (docs/benchmarks.md).
//!
//! Exactly once, the sidecar's restarts included: next to the log the sidecar keeps a checkpoint
//! ([`Checkpoint`]: its boot id, its cumulative counts per route and backend, and the log offset
//! they include), written whole (a temporary file renamed over the last one). Counts are served
//! (`GET /usage`) only after a checkpoint of them is written, so a restarted sidecar resumes, with
//! the same boot id, from counts at least as new as any the operator read, and from the offset
//! they end at: a line is neither counted twice nor missed. The Prometheus counters start again at
//! 0 after a restart (a counter reset, which Prometheus expects).
//!
//! Space: what a checkpoint covers is punched out of the file (`fallocate` `PUNCH_HOLE`): the file
//! keeps its length, Envoy appends at its end, and only the part not yet checkpointed takes disk
//! space. Where a filesystem cannot punch holes, the file grows (a warning says so).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::ledger::Counts;
use super::{Answer, Usage, UsageCounters};

/// Dynamic-metadata namespace the front listener's usage extractors write (`gateway::envoy`).
pub const METADATA_NAMESPACE: &str = crate::gateway::envoy::USAGE_METADATA;
/// Request header the front Lua sets to the model the client asked for.
pub const MODEL_HEADER: &str = "x-llmroute-model";
/// Response headers naming the backend that answered and the failure class of a failed answer.
pub const BACKEND_HEADER: &str = "x-llmroute-backend";
pub const FAILURE_HEADER: &str = "x-llmroute-failure";
/// Key of the front route's metadata (under the Lua filter's namespace) holding what the sidecar
/// needs to know of the route's backends: their prices and model mappings
/// ([`super::backends_tag`]).
pub const BACKENDS_KEY: &str = "backends";

/// The checkpoint's file name, next to the log.
pub const CHECKPOINT_FILE: &str = "usage-checkpoint.json";

/// Key of [`METADATA_NAMESPACE`] (and of a line) holding the provider's usage object as the JSON
/// text it answered with: Envoy only finds it and hands it on, the sidecar reads it
/// ([`Usage::of_provider`]), off the answer's path.
pub const USAGE_KEY: &str = "usage";
/// Key of a printed line naming the model the gateway asked the provider for
/// ([`Answer::provider_model`]).
pub const PROVIDER_MODEL_KEY: &str = "provider_model";

/// The counts a printed line has in place of the usage object's text, by key.
const COUNT_KEYS: [&str; 4] = [
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "total_tokens",
];

/// The front listener's access log line (`json_format`), also what the sidecar counts: JSON, so a
/// value (a header a client sent, a model name a provider returned) can never break a line or
/// shift a field. A value the answer lacks is `null`. No header that could carry a key.
pub fn format() -> Value {
    json!({
        "time": "%START_TIME%",
        "route": "%ROUTE_NAME%",
        "method": "%REQ(:METHOD)%",
        "path": "%REQ(:PATH)%",
        "status": "%RESPONSE_CODE%",
        "model": format!("%REQ({MODEL_HEADER})%"),
        "backend": format!("%RESP({BACKEND_HEADER})%"),
        "failure": format!("%RESP({FAILURE_HEADER})%"),
        "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
        "duration_ms": "%DURATION%",
        "flags": "%RESPONSE_FLAGS%",
        "request_id": "%REQ(X-REQUEST-ID)%",
        // The bytes an estimate counts when the answer reports no usage ([`Usage::estimate`]).
        "request_bytes": "%BYTES_RECEIVED%",
        "answer_bytes": "%BYTES_SENT%",
        USAGE_KEY: format!("%DYNAMIC_METADATA({METADATA_NAMESPACE}:{USAGE_KEY})%"),
    })
}

/// [`format`] with the route's backends (prices, model mappings), for the log the sidecar reads
/// (it takes them out of the lines it prints).
pub fn format_with_backends() -> Value {
    let mut line = format();
    line[BACKENDS_KEY] = json!(format!(
        "%METADATA(ROUTE:envoy.filters.http.lua:{BACKENDS_KEY})%"
    ));
    line
}

/// One line of the log as an [`Answer`].
pub fn answer(line: &[u8]) -> Result<Answer, serde_json::Error> {
    Ok(answer_of(&serde_json::from_slice(line)?))
}

/// The [`Answer`] of a line's fields.
fn answer_of(fields: &serde_json::Map<String, Value>) -> Answer {
    let text = |key: &str| {
        fields
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let (backend, model) = (text("backend"), text("model"));
    let status = fields
        .get("status")
        .and_then(Value::as_u64)
        .and_then(|s| u32::try_from(s).ok())
        .unwrap_or(0);
    let facts = fields
        .get(BACKENDS_KEY)
        .and_then(Value::as_str)
        .and_then(|tag| super::backend_facts(tag, &backend))
        .unwrap_or_default();
    Answer {
        route: text("route"),
        price: facts.price(),
        provider_model: facts.provider_model(&model).unwrap_or_default(),
        usage: usage_or_estimate(fields, status, &backend),
        model,
        status,
        failure: text("failure"),
        backend,
    }
}

/// The usage of a line, or the gateway's estimate ([`Usage::estimate`]) of a successful answer of
/// a provider to an operation that costs tokens (chat and text completions, responses,
/// embeddings) when it reported none.
fn usage_or_estimate(fields: &serde_json::Map<String, Value>, status: u32, backend: &str) -> Usage {
    let usage = usage_of(fields);
    if usage.reported() || !(200..300).contains(&status) || backend.is_empty() {
        return usage;
    }
    let path = fields
        .get("path")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let op = path.split('?').next().unwrap_or_default();
    let op = op.splitn(4, '/').nth(3).unwrap_or_default();
    let completion = match op {
        "chat/completions" | "completions" | "responses" => true,
        "embeddings" => false,
        _ => return usage,
    };
    let bytes = |key: &str| match fields.get(key) {
        Some(Value::Number(n)) => n.as_u64().unwrap_or(0),
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        _ => 0,
    };
    Usage::estimate(bytes("request_bytes"), bytes("answer_bytes"), completion)
}

/// The usage of a line: the provider's usage object, as Envoy logged it (its text).
fn usage_of(fields: &serde_json::Map<String, Value>) -> Usage {
    fields
        .get(USAGE_KEY)
        .and_then(Value::as_str)
        .map(Usage::of_provider)
        .unwrap_or_default()
}

/// A line as the sidecar prints it: without the route's backends, with the provider's model
/// (`null` when no backend answered), and with the counts read from the usage object
/// (`prompt_tokens`, `completion_tokens`, `cached_tokens`, `total_tokens`, each `null` when the
/// answer did not report it) in place of its text.
fn printable(
    mut fields: serde_json::Map<String, Value>,
    answer: &Answer,
) -> serde_json::Map<String, Value> {
    fields.remove(BACKENDS_KEY);
    fields.remove(USAGE_KEY);
    let provider_model = Some(answer.provider_model.as_str()).filter(|m| !m.is_empty());
    fields.insert(PROVIDER_MODEL_KEY.to_string(), provider_model.into());
    let usage = &answer.usage;
    fields.insert("usage_estimated".to_string(), usage.estimated.into());
    for (key, count) in
        COUNT_KEYS
            .into_iter()
            .zip([usage.prompt, usage.completion, usage.cached, usage.total])
    {
        fields.insert(key.to_string(), count.into());
    }
    fields
}

/// What a sidecar restarted in the same Pod resumes from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The boot id the sidecar's counts are served under (kept across its restarts).
    pub boot: String,
    /// Cumulative counts per route and backend: every answer of the log before `offset`.
    pub counts: Counts,
    /// Bytes of the log counted (always the end of a line).
    pub offset: u64,
}

/// Writes `checkpoint` to `path` whole: into a temporary file, synced, renamed over the last one.
pub fn write_checkpoint(path: &Path, checkpoint: &Checkpoint) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = File::create(&tmp)?;
    file.write_all(&serde_json::to_vec(checkpoint).map_err(io::Error::other)?)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Most of the log read at once.
const READ_CHUNK: usize = 4 << 20;

/// The sidecar's reader of the usage log.
pub struct Follower {
    log: PathBuf,
    checkpoint: PathBuf,
    /// Bytes at the start of the log already punched out.
    punched: u64,
    /// False once the filesystem refused to punch holes.
    punch: bool,
    /// Offset of the last checkpoint this follower wrote.
    checkpointed: u64,
    /// Lines that were not an answer (logged, skipped).
    malformed: u64,
    /// Where the lines read are printed (the Pod's access log: the sidecar's stdout), without
    /// the route's backends.
    echo: Option<Box<dyn Write + Send>>,
}

impl Follower {
    /// The follower of the log at `log` and the counters it counts into: restored from the
    /// checkpoint next to it when there is one (a restart of the sidecar), new otherwise.
    pub fn open(log: &Path, namespace: &str) -> (Follower, UsageCounters) {
        let checkpoint = log.with_file_name(CHECKPOINT_FILE);
        let restored = match std::fs::read(&checkpoint) {
            Ok(bytes) => match serde_json::from_slice::<Checkpoint>(&bytes) {
                Ok(c) => {
                    tracing::info!(offset = c.offset, boot = %c.boot, "usage counts restored from the checkpoint");
                    Some(c)
                }
                Err(e) => {
                    // Never expected (it is written whole). Counting the log again under a new
                    // boot would count what the operator already has twice: start at its end.
                    let end = std::fs::metadata(log).map(|m| m.len()).unwrap_or(0);
                    tracing::warn!(file = %checkpoint.display(), error = %e, offset = end, "unreadable usage checkpoint: counting the log from its current end");
                    Some(Checkpoint {
                        boot: String::new(),
                        counts: Counts::new(),
                        offset: end,
                    })
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!(file = %checkpoint.display(), error = %e, "cannot read the usage checkpoint: counting the log from its start");
                None
            }
        };
        let start = restored.as_ref().map_or(0, |c| c.offset);
        let counters = match restored {
            Some(c) if !c.boot.is_empty() => UsageCounters::restored(namespace, c),
            Some(c) => {
                let counters = UsageCounters::new(namespace);
                counters.skip_to(c.offset);
                counters
            }
            None => UsageCounters::new(namespace),
        };
        let follower = Follower {
            log: log.to_path_buf(),
            checkpoint,
            // What a checkpoint covers was punched by the process that wrote it (or can be again).
            punched: start & !(BLOCK - 1),
            punch: true,
            checkpointed: start,
            malformed: 0,
            echo: None,
        };
        (follower, counters)
    }

    /// Prints every line read to `out` (the sidecar's stdout: the log is the gateway's access log).
    pub fn echo(mut self, out: impl Write + Send + 'static) -> Self {
        self.echo = Some(Box::new(io::BufWriter::new(out)));
        self
    }

    /// Where the checkpoint is.
    pub fn checkpoint_path(&self) -> &Path {
        &self.checkpoint
    }

    /// Counts the whole lines Envoy appended since the last call; returns how many.
    pub fn poll(&mut self, counters: &UsageCounters) -> io::Result<usize> {
        let mut file = match File::open(&self.log) {
            Ok(f) => f,
            // Envoy creates it with its listeners.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let len = file.metadata()?.len();
        let mut offset = counters.offset();
        if len < offset {
            tracing::warn!(file = %self.log.display(), len, offset, "the usage log is shorter than what was counted (replaced?): counting it from its start");
            counters.skip_to(0);
            offset = 0;
            self.punched = 0;
            self.checkpointed = 0;
        }
        let mut lines = 0;
        let mut buf = Vec::new();
        while offset < len {
            let want = (len - offset).min(READ_CHUNK as u64) as usize;
            buf.resize(want, 0);
            file.seek(SeekFrom::Start(offset))?;
            file.read_exact(&mut buf)?;
            let Some(last) = buf.iter().rposition(|b| *b == b'\n') else {
                if want < READ_CHUNK {
                    break; // a line Envoy is still writing
                }
                tracing::warn!(
                    offset,
                    "a usage log line longer than {READ_CHUNK} bytes: skipped"
                );
                offset += want as u64;
                counters.record_lines(&[], offset);
                continue;
            };
            let mut answers = Vec::new();
            for line in buf[..last].split(|b| *b == b'\n') {
                // NULs: a hole punched by an earlier run; never expected past the offset.
                let line = line.trim_ascii();
                let line = &line[line.iter().take_while(|b| **b == 0).count()..];
                if line.is_empty() {
                    continue;
                }
                match serde_json::from_slice::<serde_json::Map<String, Value>>(line) {
                    Ok(fields) => {
                        let answer = answer_of(&fields);
                        if let Some(out) = self.echo.as_mut() {
                            // Output gone (nobody reads the Pod's log) is no reason to stop counting.
                            let _ = serde_json::to_writer(&mut *out, &printable(fields, &answer));
                            let _ = out.write_all(b"\n");
                        }
                        answers.push(answer);
                    }
                    Err(e) => {
                        self.malformed += 1;
                        if self.malformed.is_power_of_two() {
                            tracing::warn!(error = %e, malformed = self.malformed, "usage log lines that are not an answer: skipped");
                        }
                    }
                }
            }
            if let Some(out) = self.echo.as_mut() {
                let _ = out.flush();
            }
            lines += answers.len();
            offset += last as u64 + 1;
            counters.record_lines(&answers, offset);
        }
        Ok(lines)
    }

    /// Writes a checkpoint when there is something new to write, then frees the part of the log
    /// it covers.
    pub fn checkpoint(&mut self, counters: &UsageCounters) -> io::Result<()> {
        if counters.offset() == self.checkpointed {
            return Ok(());
        }
        let path = self.checkpoint.clone();
        let offset = counters.persist(false, |c| write_checkpoint(&path, c))?.1;
        self.checkpointed = offset;
        let to = offset & !(BLOCK - 1);
        if self.punch && to > self.punched {
            let punched = OpenOptions::new()
                .write(true)
                .open(&self.log)
                .and_then(|file| {
                    rustix::fs::fallocate(
                        &file,
                        rustix::fs::FallocateFlags::PUNCH_HOLE
                            | rustix::fs::FallocateFlags::KEEP_SIZE,
                        self.punched,
                        to - self.punched,
                    )
                    .map_err(io::Error::from)
                });
            match punched {
                Ok(()) => self.punched = to,
                // Counting goes on; only the space is not given back.
                Err(e) => {
                    self.punch = false;
                    tracing::warn!(file = %self.log.display(), error = %e, "the filesystem cannot punch holes: the usage log keeps growing");
                }
            }
        }
        Ok(())
    }
}

/// Unit of the holes punched into the log (a filesystem block).
const BLOCK: u64 = 4096;
/// How often the log is read (Envoy writes it out every second).
pub const POLL: Duration = Duration::from_millis(200);
/// How often a checkpoint is written while the counts change (besides every `GET /usage`).
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(5);

/// Follows the log until `stop` is set, then reads it a last time and writes a last checkpoint.
/// Blocking: run it on a thread of its own.
pub fn follow(mut follower: Follower, counters: Arc<UsageCounters>, stop: Arc<AtomicBool>) {
    tracing::info!(file = %follower.log.display(), "following the gateway's usage log");
    let mut last_checkpoint = Instant::now();
    let mut failing = false;
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        let result = follower.poll(&counters).and_then(|_| {
            if stopping || last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
                last_checkpoint = Instant::now();
                follower.checkpoint(&counters)
            } else {
                Ok(())
            }
        });
        match result {
            Err(e) if !failing => {
                failing = true;
                tracing::error!(file = %follower.log.display(), error = %e, "cannot follow the usage log: token usage is not counted");
            }
            Err(_) => {}
            Ok(()) if failing => {
                failing = false;
                tracing::info!(file = %follower.log.display(), "following the usage log again");
            }
            Ok(()) => {}
        }
        if stopping {
            return;
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(route: &str, backend: &str, prompt: u64, completion: u64) -> String {
        format!(
            r#"{{"backend":"{backend}","backends":"{{\"zhipu\":{{\"cost\":{{\"input\":\"1\",\"output\":\"2\"}},\"models\":{{\"fast\":\"glm-4-flash\"}}}}}}","failure":null,"model":"fast","route":"{route}","status":200,"usage":"{{\"prompt_tokens\":{prompt},\"completion_tokens\":{completion}}}"}}"#
        ) + "\n"
    }

    fn append(path: &Path, text: &str) {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    fn tokens(c: &UsageCounters, route: &str, backend: &str) -> u64 {
        c.report()
            .counts
            .get(route)
            .and_then(|b| b.get(backend))
            .map_or(0, |t| t.tokens)
    }

    #[test]
    fn a_line_as_envoy_writes_it_is_read_back() {
        let a = answer(br#"{"backend":"deepseek","failure":"RateLimited","model":"chat","backends":"{\"zhipu\":{\"cost\":{\"input\":\"1\",\"output\":\"2\"}},\"deepseek\":{\"cost\":{\"input\":\"0.27\",\"output\":\"1.1\"},\"models\":{\"chat\":\"deepseek-chat\"}}}","route":"chat","status":429,"usage":"{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9,\"prompt_cache_hit_tokens\":1}"}"#).unwrap();
        assert_eq!(
            a,
            Answer {
                route: "chat".into(),
                backend: "deepseek".into(),
                model: "chat".into(),
                provider_model: "deepseek-chat".into(),
                status: 429,
                failure: "RateLimited".into(),
                usage: Usage {
                    prompt: Some(7),
                    completion: Some(2),
                    cached: Some(1),
                    total: Some(9),
                    estimated: false,
                },
                price: Some(super::super::Price {
                    input: 0.27,
                    output: 1.1
                }),
            }
        );
        // An answer of the gateway itself: nulls everywhere but the route and status.
        let own = answer(br#"{"backend":null,"failure":null,"model":null,"backends":null,"route":"chat","status":200,"usage":null}"#).unwrap();
        assert_eq!(own.backend, "");
        assert!(!own.usage.reported());
        assert!(answer(b"not json").is_err());
    }

    #[test]
    fn every_format_key_is_read() {
        let keys: Vec<String> = format().as_object().unwrap().keys().cloned().collect();
        let mut fields = serde_json::Map::new();
        for k in &keys {
            fields.insert(k.clone(), json!(null));
        }
        let read = answer(serde_json::to_string(&fields).unwrap().as_bytes()).unwrap();
        assert_eq!(read, Answer::default());
        for k in [USAGE_KEY, "route", "backend", "model", "status"] {
            assert!(keys.iter().any(|key| key == k), "{k}");
        }
    }

    /// A successful answer of a provider without usage is counted by the estimate, for the
    /// operations that cost tokens only; a failed one, the gateway's own, or one with usage, not.
    #[test]
    fn answers_without_usage_are_estimated_from_their_bytes() {
        let line = |path: &str, status: u32, backend: &str, usage: &str| {
            answer(
                json!({ "route": "chat", "backend": backend, "status": status, "path": path,
                    "request_bytes": 401, "answer_bytes": "1000", "usage": usage })
                .to_string()
                .as_bytes(),
            )
            .unwrap()
            .usage
        };
        let streamed = line("/chat/v1/chat/completions", 200, "zhipu", "");
        assert_eq!(
            streamed,
            Usage {
                prompt: Some(101),
                completion: Some(250),
                cached: None,
                total: Some(351),
                estimated: true,
            }
        );
        assert_eq!(streamed.budgeted(), 351);
        let q = line("/chat/v1/completions?x=1", 200, "zhipu", "");
        assert_eq!(
            (q.prompt, q.completion, q.estimated),
            (Some(101), Some(250), true)
        );
        let e = line("/chat/v1/embeddings", 200, "zhipu", "");
        assert_eq!((e.prompt, e.completion), (Some(101), Some(0)));
        assert!(line("/chat/v1/responses", 201, "x", "").estimated);
        for (path, status, backend) in [
            ("/chat/v1/chat/completions", 429, "zhipu"),
            ("/chat/v1/chat/completions", 200, ""),
            ("/chat/v1/models", 200, "zhipu"),
            ("/chat/v1/files", 200, "zhipu"),
        ] {
            assert_eq!(
                line(path, status, backend, ""),
                Usage::default(),
                "{path} {status}"
            );
        }
        let reported = line(
            "/chat/v1/chat/completions",
            200,
            "zhipu",
            r#"{"prompt_tokens":3,"completion_tokens":4}"#,
        );
        assert_eq!((reported.prompt, reported.estimated), (Some(3), false));
        // An opted-in operation's charge, as the front Lua hands it on.
        let charged = line(
            "/chat/v1/files",
            200,
            "zhipu",
            r#"{"prompt_tokens":7,"completion_tokens":0,"total_tokens":7,"llmroute_estimated":true}"#,
        );
        assert_eq!((charged.budgeted(), charged.estimated), (7, true));
    }

    /// What the sidecar prints: the counts in place of the usage object's text, the provider's
    /// model, and not the route's backends.
    #[test]
    fn a_printed_line_has_counts_and_no_prices() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("usage.log");
        let printed = dir.path().join("printed");
        append(&log, &line("chat", "zhipu", 10, 5));
        append(&log, "{\"route\":\"chat\",\"status\":401,\"usage\":null}\n");
        let (f, c) = Follower::open(&log, "ns");
        let mut f = f.echo(File::create(&printed).unwrap());
        assert_eq!(f.poll(&c).unwrap(), 2);
        drop(f);
        let text = std::fs::read_to_string(&printed).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["prompt_tokens"], 10);
        assert_eq!(lines[0]["completion_tokens"], 5);
        assert_eq!(lines[0]["total_tokens"], Value::Null);
        assert_eq!(lines[0]["provider_model"], "glm-4-flash");
        assert_eq!(lines[1]["prompt_tokens"], Value::Null);
        assert_eq!(lines[1]["provider_model"], Value::Null);
        for l in &lines {
            assert!(
                l.get(BACKENDS_KEY).is_none() && l.get(USAGE_KEY).is_none(),
                "{l}"
            );
        }
    }

    #[test]
    fn lines_are_counted_once_across_restarts_and_half_lines_wait() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("usage.log");
        let (mut f, c) = Follower::open(&log, "ns");
        assert_eq!(f.poll(&c).unwrap(), 0, "no log yet");
        let boot = c.report().boot;
        append(&log, &line("chat", "zhipu", 10, 5));
        let half = line("chat", "zhipu", 100, 50);
        append(&log, &half[..40]);
        assert_eq!(f.poll(&c).unwrap(), 1);
        assert_eq!(tokens(&c, "chat", "zhipu"), 15, "the half line waits");
        append(&log, &half[40..]);
        assert_eq!(f.poll(&c).unwrap(), 1);
        assert_eq!(tokens(&c, "chat", "zhipu"), 165);

        // Served counts are checkpointed first; a restart resumes from them with the same boot.
        let served = c
            .persist(true, |cp| write_checkpoint(f.checkpoint_path(), cp))
            .unwrap()
            .0;
        assert_eq!(served.counts["chat"]["zhipu"].tokens, 165);
        append(&log, &line("chat", "zhipu", 1, 1));
        assert_eq!(
            f.poll(&c).unwrap(),
            1,
            "counted, not checkpointed: lost with the process"
        );
        drop((f, c));
        let (mut f, c) = Follower::open(&log, "ns");
        assert_eq!(c.report().boot, boot);
        assert_eq!(
            f.poll(&c).unwrap(),
            1,
            "the line after the checkpoint is counted again"
        );
        assert_eq!(tokens(&c, "chat", "zhipu"), 167);
        assert!(c.unread(true));

        // A log shorter than the offset was replaced: it is counted from its start.
        std::fs::write(&log, line("chat", "deepseek", 3, 4)).unwrap();
        assert_eq!(f.poll(&c).unwrap(), 1);
        assert_eq!(tokens(&c, "chat", "deepseek"), 7);
        // Garbage is skipped, the lines around it counted.
        append(
            &log,
            &format!("garbage\n{}", line("chat", "deepseek", 1, 0)),
        );
        assert_eq!(f.poll(&c).unwrap(), 1);
        assert_eq!(tokens(&c, "chat", "deepseek"), 8);
    }

    #[test]
    fn checkpointed_lines_are_punched_out_and_never_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("usage.log");
        let (mut f, c) = Follower::open(&log, "ns");
        let text: String = (0..200).map(|_| line("chat", "zhipu", 2, 1)).collect();
        append(&log, &text);
        assert_eq!(f.poll(&c).unwrap(), 200);
        f.checkpoint(&c).unwrap();
        let len = std::fs::metadata(&log).unwrap().len();
        assert_eq!(len, text.len() as u64, "the log keeps its length");
        let start = std::fs::read(&log).unwrap();
        if f.punch {
            assert!(
                start[..4096].iter().all(|b| *b == 0),
                "the first block is a hole"
            );
        }
        append(&log, &line("chat", "zhipu", 2, 1));
        drop((f, c));
        let (mut f, c) = Follower::open(&log, "ns");
        assert_eq!(f.poll(&c).unwrap(), 1);
        assert_eq!(tokens(&c, "chat", "zhipu"), 603);
    }
}
