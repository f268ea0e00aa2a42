//! The Virtual Node Gate's protocol (GCA paper, section 4): what the gate inside a VMM job's
//! guest (`scripts/vmm-guest/gate.sh`) and the wrapper on the host
//! (`gca_wrappers::vmm`) say to each other over the virtio-serial port
//! [`PORT_NAME`]. One line per message; `FILES` is followed by that many bytes of a tar
//! archive of the job's directory.

/// The name of the virtio-serial port (`virtserialport,name=...`).
pub const PORT_NAME: &str = "org.gca.gate";

/// The longest line either side sends.
pub const MAX_LINE: usize = 4096;

/// What the gate (guest) tells the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromGuest {
    /// The job's disk is mounted; the job is being started.
    Ready,
    /// A tar archive of the job's directory follows, this many bytes.
    Files(u64),
    /// The job ended with this status (as the guest's shell reports it: 128+N for signal N).
    Exit(i32),
    /// The gate could not start the job.
    Fail(String),
}

/// What the host tells the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToGuest {
    /// Send SIGTERM to the job's process group.
    Term,
    /// The host has the job's status: the gate may power the guest off.
    Bye,
}

impl FromGuest {
    /// Reads one line (without its newline).
    pub fn parse(line: &str) -> Result<Self, String> {
        let line = line.trim_end_matches(['\r', '\n']);
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        match word {
            "READY" if rest.is_empty() => Ok(Self::Ready),
            "FILES" => rest
                .parse()
                .map(Self::Files)
                .map_err(|_| format!("bad FILES size {rest:?}")),
            "EXIT" => rest
                .parse()
                .map(Self::Exit)
                .map_err(|_| format!("bad EXIT status {rest:?}")),
            "FAIL" => Ok(Self::Fail(rest.to_string())),
            _ => Err(format!(
                "unknown message from the guest: {:?}",
                truncate(line)
            )),
        }
    }
}

impl ToGuest {
    /// The line to send, with its newline.
    pub fn line(self) -> &'static str {
        match self {
            Self::Term => "TERM\n",
            Self::Bye => "BYE\n",
        }
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(80) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_messages_parse() {
        assert_eq!(FromGuest::parse("READY\n"), Ok(FromGuest::Ready));
        assert_eq!(FromGuest::parse("FILES 10240"), Ok(FromGuest::Files(10240)));
        assert_eq!(FromGuest::parse("EXIT 7"), Ok(FromGuest::Exit(7)));
        assert_eq!(
            FromGuest::parse("FAIL cannot mount the job disk"),
            Ok(FromGuest::Fail("cannot mount the job disk".into()))
        );
        assert!(FromGuest::parse("EXIT seven").is_err());
        assert!(FromGuest::parse("FILES -1").is_err());
        assert!(FromGuest::parse("READY now").is_err());
        assert!(FromGuest::parse("HELLO").is_err());
        assert_eq!(ToGuest::Term.line(), "TERM\n");
    }
}
