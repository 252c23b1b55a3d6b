//! The gateway Pod's reader of the usage log (`crate::usage::log`): follows the file Envoy writes
//! and counts each line into [`UsageCounters`].
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

use serde_json::Value;

use super::counters::{Checkpoint, UsageCounters};
use crate::usage::ledger::Counts;
use crate::usage::log::{answer_of, printable};

/// The checkpoint's file name, next to the log.
pub const CHECKPOINT_FILE: &str = "usage-checkpoint.json";

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
                        settled: Default::default(),
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
        let offset = counters.persist(|c| write_checkpoint(&path, c))?.1;
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
    use crate::usage::log::{BACKENDS_KEY, USAGE_KEY};

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
            .persist(|cp| write_checkpoint(f.checkpoint_path(), cp))
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
