//! A small typed QMP client (the QEMU Machine Protocol: JSON objects, one per line, on a UNIX
//! socket), blocking, every read bounded by a deadline. Only what the VMM driver needs:
//! the greeting and capability negotiation, commands with arguments, commands that pass a
//! file descriptor (`getfd`, `add-fd`: `SCM_RIGHTS` on the command's bytes), events skipped.
//!
//! Why not a crate: `qapi` (the maintained QMP crate) generates the whole QAPI schema of one
//! QEMU version and brings its own async stack; this driver uses about fifteen commands.

use std::io::{BufRead, BufReader, IoSlice, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The longest line QMP may send (query answers here are small; a `query-*` answer of a
/// large VM is a few KiB).
const MAX_LINE: usize = 1 << 20;

/// A QMP failure: the connection, the protocol, or an error QEMU returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QmpError {
    /// Connecting, reading or writing failed, or the deadline passed.
    Io(String),
    /// QEMU sent something that is not QMP.
    Protocol(String),
    /// QEMU answered the command with an error (its class and description).
    Command { class: String, desc: String },
}

impl std::fmt::Display for QmpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QmpError::Io(m) => write!(f, "QMP connection: {m}"),
            QmpError::Protocol(m) => write!(f, "QMP protocol: {m}"),
            QmpError::Command { class, desc } => write!(f, "QEMU refused ({class}): {desc}"),
        }
    }
}

/// One QMP session.
pub struct Qmp {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    deadline: Instant,
    /// The QEMU version from the greeting (`7.2.22`).
    pub version: String,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("version", &self.version)
            .finish()
    }
}

fn io(what: &str, e: impl std::fmt::Display) -> QmpError {
    QmpError::Io(format!("{what}: {e}"))
}

impl Qmp {
    /// Wraps a connected socket: reads the greeting and negotiates capabilities. Every later
    /// read must finish before `deadline`.
    pub fn handshake(stream: UnixStream, deadline: Instant) -> Result<Self, QmpError> {
        let reader = BufReader::new(stream.try_clone().map_err(|e| io("clone", e))?);
        let mut q = Qmp {
            stream,
            reader,
            deadline,
            version: String::new(),
        };
        let greeting = q.read_message()?;
        let v = greeting
            .get("QMP")
            .and_then(|g| g.get("version"))
            .and_then(|v| v.get("qemu"))
            .ok_or_else(|| QmpError::Protocol(format!("no QMP greeting: {greeting}")))?;
        q.version = format!(
            "{}.{}.{}",
            v["major"].as_u64().unwrap_or(0),
            v["minor"].as_u64().unwrap_or(0),
            v["micro"].as_u64().unwrap_or(0)
        );
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    /// Connects to the QMP socket at `path` (retrying while QEMU has not created it yet, until
    /// `deadline`) and negotiates.
    pub fn connect_waiting(path: &Path, deadline: Instant) -> Result<Self, QmpError> {
        loop {
            match UnixStream::connect(path) {
                Ok(s) => return Self::handshake(s, deadline),
                Err(e) if Instant::now() >= deadline => {
                    return Err(io(&format!("connecting to {}", path.display()), e))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Moves the deadline of later reads.
    pub fn set_deadline(&mut self, deadline: Instant) {
        self.deadline = deadline;
    }

    /// Runs one command; returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        self.send(command, arguments, None)?;
        self.answer()
    }

    /// Runs one command passing `fd` with it (`getfd`, `add-fd`).
    pub fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Value,
        fd: BorrowedFd<'_>,
    ) -> Result<Value, QmpError> {
        self.send(command, Some(arguments), Some(fd))?;
        self.answer()
    }

    fn send(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        let bytes = line.as_bytes();
        match fd {
            None => self
                .stream
                .write_all(bytes)
                .map_err(|e| io(&format!("sending {command}"), e)),
            Some(fd) => {
                use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
                let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
                let mut control = SendAncillaryBuffer::new(&mut space);
                let fds = [fd];
                if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
                    return Err(QmpError::Io("no room for the descriptor".into()));
                }
                // The descriptor goes with the first byte; the rest of the line follows.
                let sent = sendmsg(
                    self.stream.as_fd(),
                    &[IoSlice::new(&bytes[..1])],
                    &mut control,
                    SendFlags::empty(),
                )
                .map_err(|e| io(&format!("sending {command}"), e))?;
                if sent != 1 {
                    return Err(QmpError::Io(format!("sending {command}: short write")));
                }
                self.stream
                    .write_all(&bytes[1..])
                    .map_err(|e| io(&format!("sending {command}"), e))
            }
        }
    }

    /// The answer to the command just sent (events before it are skipped).
    fn answer(&mut self) -> Result<Value, QmpError> {
        loop {
            let msg = self.read_message()?;
            if let Some(r) = msg.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = msg.get("error") {
                return Err(QmpError::Command {
                    class: e["class"].as_str().unwrap_or("?").to_string(),
                    desc: e["desc"].as_str().unwrap_or("?").to_string(),
                });
            }
            if msg.get("event").is_none() {
                return Err(QmpError::Protocol(format!("unexpected message: {msg}")));
            }
        }
    }

    fn read_message(&mut self) -> Result<Value, QmpError> {
        let left = self
            .deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| QmpError::Io("QEMU did not answer in time".into()))?;
        self.stream
            .set_read_timeout(Some(left))
            .map_err(|e| io("setting a timeout", e))?;
        let mut line = Vec::new();
        let n = std::io::Read::take(&mut self.reader, MAX_LINE as u64)
            .read_until(b'\n', &mut line)
            .map_err(|e| io("reading", e))?;
        if n == 0 {
            return Err(QmpError::Io("QEMU closed the connection".into()));
        }
        if line.last() != Some(&b'\n') {
            return Err(QmpError::Protocol("a line too long".into()));
        }
        serde_json::from_slice(&line).map_err(|e| QmpError::Protocol(format!("not JSON: {e}")))
    }

    /// `query-status`: the VM's run state (`running`, `paused`, `postmigrate`, `inmigrate`).
    pub fn status(&mut self) -> Result<String, QmpError> {
        let v = self.execute("query-status", None)?;
        v["status"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| QmpError::Protocol(format!("query-status answered {v}")))
    }

    /// Polls `query-status` until it is one of `states` (or the deadline passes).
    pub fn wait_status(&mut self, states: &[&str]) -> Result<String, QmpError> {
        loop {
            let s = self.status()?;
            if states.contains(&s.as_str()) {
                return Ok(s);
            }
            if Instant::now() >= self.deadline {
                return Err(QmpError::Io(format!(
                    "the VM is still {s:?}, not {states:?}, at the deadline"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls `query-migrate` until the migration completed; an error if it failed.
    pub fn wait_migration(&mut self) -> Result<Value, QmpError> {
        loop {
            let v = self.execute("query-migrate", None)?;
            match v["status"].as_str() {
                Some("completed") => return Ok(v),
                Some("failed") | Some("cancelled") => {
                    return Err(QmpError::Command {
                        class: "MigrationFailed".into(),
                        desc: v["error-desc"]
                            .as_str()
                            .unwrap_or("the migration failed")
                            .to_string(),
                    })
                }
                _ => {}
            }
            if Instant::now() >= self.deadline {
                let _ = self.execute("migrate_cancel", None);
                return Err(QmpError::Io("the migration did not finish in time".into()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Polls `query-jobs` until job `id` concluded; returns its error, if any, after
    /// dismissing it.
    pub fn wait_job(&mut self, id: &str) -> Result<(), QmpError> {
        loop {
            let v = self.execute("query-jobs", None)?;
            let job = v
                .as_array()
                .and_then(|jobs| jobs.iter().find(|j| j["id"] == id))
                .cloned()
                .ok_or_else(|| QmpError::Protocol(format!("block job {id} vanished")))?;
            if job["status"] == "concluded" {
                let _ = self.execute("job-dismiss", Some(json!({ "id": id })));
                return match job["error"].as_str() {
                    Some(e) => Err(QmpError::Command {
                        class: "BlockJobFailed".into(),
                        desc: e.to_string(),
                    }),
                    None => Ok(()),
                };
            }
            if Instant::now() >= self.deadline {
                let _ = self.execute("job-cancel", Some(json!({ "id": id, "force": true })));
                return Err(QmpError::Io(format!(
                    "block job {id} did not finish in time"
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
