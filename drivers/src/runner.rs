//! Running a core checkpointer's command line with a bound: stdin from `/dev/null`, the last
//! [`OUTPUT_TAIL`] bytes of stdout and stderr kept, killed (with its process group) when it
//! runs too long; and the helpers that turn what it printed and how it ended into messages.
//! Every driver that runs a program (CRIU, command templates) uses this module.

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::time::Instant;

/// How much of each output stream is kept.
pub(crate) const OUTPUT_TAIL: usize = 4096;

/// What a command printed (the last [`OUTPUT_TAIL`] bytes of each stream) and how it ended.
#[derive(Debug, Clone)]
pub(crate) struct RunOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// What was printed before a command timed out.
#[derive(Debug, Clone, Default)]
pub(crate) struct Partial {
    pub stdout: String,
    pub stderr: String,
}

#[derive(Debug)]
pub(crate) enum RunError {
    Spawn(std::io::Error),
    /// The command ran past its bound and was killed (with its process group, if it had one).
    Timeout(Partial),
}

pub(crate) trait Said {
    fn streams(&self) -> (&str, &str);
}
impl Said for RunOutput {
    fn streams(&self) -> (&str, &str) {
        (&self.stdout, &self.stderr)
    }
}
impl Said for Partial {
    fn streams(&self) -> (&str, &str) {
        (&self.stdout, &self.stderr)
    }
}

/// `": <last lines of stderr (or stdout)>"`, or nothing when the command printed nothing.
pub(crate) fn said_suffix(out: &impl Said) -> String {
    let (stdout, stderr) = out.streams();
    let lines = last_lines(stderr, 5).or_else(|| last_lines(stdout, 5));
    match lines {
        Some(l) => format!(": {l}"),
        None => String::new(),
    }
}

/// The last `n` non-empty lines of `text`, joined with " | ".
pub(crate) fn last_lines(text: &str, n: usize) -> Option<String> {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return None;
    }
    Some(lines[lines.len().saturating_sub(n)..].join(" | "))
}

pub(crate) fn last_line(text: &str) -> Option<String> {
    last_lines(text, 1)
}

/// "exit status 3", "killed by signal 9".
pub(crate) fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        (None, None) => status.to_string(),
    }
}

/// Quotes argv for messages and logs.
pub(crate) fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%{}".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The last `limit` bytes of a stream.
#[derive(Debug)]
struct Tail {
    buf: Vec<u8>,
    limit: usize,
    dropped: bool,
}

impl Tail {
    fn new(limit: usize) -> Self {
        Self {
            buf: Vec::new(),
            limit,
            dropped: false,
        }
    }
    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() > self.limit {
            let cut = self.buf.len() - self.limit;
            self.buf.drain(..cut);
            self.dropped = true;
        }
    }
    fn text(&self) -> String {
        let text = String::from_utf8_lossy(&self.buf);
        if self.dropped {
            // Start at a line boundary when some output was dropped.
            let rest = text.split_once('\n').map_or(&*text, |(_, r)| r);
            format!("[...]\n{rest}")
        } else {
            text.into_owned()
        }
    }
}

/// How long to keep reading output after the command exited: a process it left in the
/// background may hold the pipes open for good.
const DRAIN_GRACE: Duration = Duration::from_millis(300);

/// Runs `cmd` (stdin from /dev/null, stdout and stderr captured) for at most `timeout`; on
/// timeout kills it (and, with `own_group`, the process group it leads) and reaps it.
pub(crate) async fn run(
    mut cmd: tokio::process::Command,
    timeout: Duration,
    own_group: bool,
) -> Result<RunOutput, RunError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if own_group {
        cmd.process_group(0);
    }
    let mut child = cmd.spawn().map_err(RunError::Spawn)?;
    let pid = child.id().and_then(|p| i32::try_from(p).ok());
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let (mut out_tail, mut err_tail) = (Tail::new(OUTPUT_TAIL), Tail::new(OUTPUT_TAIL));
    let (mut out_buf, mut err_buf) = ([0u8; 4096], [0u8; 4096]);
    let deadline = Instant::now() + timeout;
    let mut status: Option<ExitStatus> = None;
    let mut until = deadline;
    loop {
        if status.is_some() && stdout.is_none() && stderr.is_none() {
            break;
        }
        tokio::select! {
            r = async { stdout.as_mut().unwrap().read(&mut out_buf).await }, if stdout.is_some() => {
                match r {
                    Ok(n) if n > 0 => out_tail.push(&out_buf[..n]),
                    _ => stdout = None,
                }
            }
            r = async { stderr.as_mut().unwrap().read(&mut err_buf).await }, if stderr.is_some() => {
                match r {
                    Ok(n) if n > 0 => err_tail.push(&err_buf[..n]),
                    _ => stderr = None,
                }
            }
            s = child.wait(), if status.is_none() => {
                match s {
                    Ok(s) => {
                        status = Some(s);
                        until = Instant::now() + DRAIN_GRACE;
                    }
                    Err(e) => return Err(RunError::Spawn(e)),
                }
            }
            _ = tokio::time::sleep_until(until) => {
                if status.is_some() {
                    break; // exited; something else holds its output open
                }
                if let (true, Some(pid)) = (own_group, pid.and_then(rustix::process::Pid::from_raw)) {
                    let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
                }
                let _ = child.kill().await;
                return Err(RunError::Timeout(Partial {
                    stdout: out_tail.text(),
                    stderr: err_tail.text(),
                }));
            }
        }
    }
    Ok(RunOutput {
        status: status.expect("the loop ends only after the command exited"),
        stdout: out_tail.text(),
        stderr: err_tail.text(),
    })
}

/// Reads a PID written by a core checkpointer (`criu --pidfile`, a script's `echo $! >`).
pub(crate) fn read_pid_file(path: &Path) -> Result<i32, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("its PID file {} cannot be read: {e}", path.display()))?;
    text.trim()
        .parse::<i32>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| {
            format!(
                "its PID file {} does not hold a PID: {:?}",
                path.display(),
                text.chars().take(40).collect::<String>()
            )
        })
}
