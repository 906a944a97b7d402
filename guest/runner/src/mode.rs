//! The runner's built-in modes, chosen by its first argument.

use core::fmt;

/// What the runner was asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode<'a> {
    /// Print `hello from cella-runner` and exit 0.
    Hello,
    /// Exit with the given status.
    Exit(u32),
    /// Touch an unmapped address (the VMM must report a crash).
    Fault,
    /// Loop forever (the VMM must time out).
    Spin,
    /// Write a known pattern over all the heap, then exit 0 (the scrub must erase it).
    FillCanary,
    /// Read the whole heap; print its FNV-1a 64 hash (of its 64-bit words) and how many words
    /// hold the canary; exit 0. A VM restored from a template must see the template's bytes
    /// or zeros there, never another job's.
    HeapHash,
    /// Write this many 4000-byte console lines, then exit 0 (the console bounds must hold).
    Flood(u32),
    /// Read the whole virtio-blk disk; print its size and FNV-1a 64 hash; exit 0.
    ReadDisk,
    /// Connect to this host vsock port, echo everything received until the host closes.
    VsockEcho(u32),
    /// Listen on this guest vsock port, accept one host connection, echo it until it closes.
    VsockServe(u32),
    /// Break the virtio contract on purpose (the VMM must end the VM with the reason).
    Hostile(Hostile),
    /// Run a task on every vCPU the VM has (the boot vCPU and a helper, if the VMM gave it
    /// one): each sums its half of a series, or the helper misbehaves.
    Helper(HelperTest),
    /// Fetch a scan job over vsock, scan the artifact on the disk, send back SARIF + summary.
    Scan,
    /// Build a template: set up the devices, build the scan engine from the policy on the
    /// disk (its length as a little-endian `u64`, then the serialized policy), then park (see
    /// `cella_abi::ports::PARK`). A VM restored from the snapshot goes on from there with the
    /// arguments its VMM wrote: `scan` uses the engine built here.
    Template,
    /// Load the artifact on the disk into an in-memory index once, then answer session
    /// requests on vsock port 1025 until told to stop.
    Session(SessionArgs<'a>),
}

/// `session SIZE READ_POLICY NAME`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionArgs<'a> {
    /// The artifact's exact size in bytes (the disk is padded to whole sectors).
    pub artifact_size: u64,
    pub read_policy: ReadPolicy,
    /// The artifact's name (for format detection of a plain file and its path).
    pub artifact_name: &'a str,
}

/// What a session's `read` may return.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadPolicy {
    /// No file contents leave the VM.
    Deny,
    /// Contents with every finding of the request's policy masked.
    Redact,
    /// Contents as they are.
    Allow,
}

impl ReadPolicy {
    /// The name used in arguments and answers.
    pub fn as_str(self) -> &'static str {
        match self {
            ReadPolicy::Deny => "deny",
            ReadPolicy::Redact => "redact",
            ReadPolicy::Allow => "allow",
        }
    }

    fn parse(arg: &[u8]) -> Option<ReadPolicy> {
        [ReadPolicy::Deny, ReadPolicy::Redact, ReadPolicy::Allow]
            .into_iter()
            .find(|p| p.as_str().as_bytes() == arg)
    }
}

/// The ways `hostile` breaks a device's contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hostile {
    /// A descriptor chain that points back at itself.
    LoopChain,
    /// A descriptor outside guest memory.
    OutsideMemory,
    /// A descriptor whose address plus length overflows.
    LengthOverflow,
    /// A request header the device would have to write.
    WrongDirection,
    /// A queue size that is not a power of two.
    QueueSize,
    /// A notify for a queue that does not exist.
    BadNotify,
}

impl Hostile {
    const ALL: [(&'static [u8], Hostile); 6] = [
        (b"loop-chain", Hostile::LoopChain),
        (b"outside-memory", Hostile::OutsideMemory),
        (b"length-overflow", Hostile::LengthOverflow),
        (b"wrong-direction", Hostile::WrongDirection),
        (b"queue-size", Hostile::QueueSize),
        (b"bad-notify", Hostile::BadNotify),
    ];
}

/// What `helper` does on the helper vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HelperTest {
    /// Sum half the series and report it: prints `vcpus N: sums A B`, exits 0.
    Sum,
    /// Touch an unmapped address on the helper (the VMM must end the VM as crashed).
    Fault,
    /// Loop forever on the helper (the VMM must time the VM out and stop both vCPUs).
    Spin,
}

impl HelperTest {
    const ALL: [(&'static [u8], HelperTest); 3] =
        [(b"sum", HelperTest::Sum), (b"fault", HelperTest::Fault), (b"spin", HelperTest::Spin)];
}

/// How many terms `helper sum` adds (0..HELPER_SUM_TERMS), split between the vCPUs.
pub const HELPER_SUM_TERMS: u64 = 200_000_000;

/// FNV-1a, 64-bit: how `read-disk` reports what it read (the tests compute it too).
pub fn fnv1a64(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// The length prefix of a template's policy disk: a little-endian `u64`, then the policy.
pub const TEMPLATE_POLICY_HEADER: usize = 8;

/// The largest policy a template disk may carry.
pub const TEMPLATE_POLICY_MAX: u64 = 64 << 20;

/// FNV-1a's starting value.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// The pattern `fill-canary` writes, one `u64` at a time.
pub const CANARY: u64 = 0xC311_A5CA_4A21_0BAD;

/// Why the arguments were refused.
#[derive(Debug, PartialEq, Eq)]
pub enum UsageError<'a> {
    /// No mode was given.
    Missing,
    /// The mode is not one of ours.
    UnknownMode(&'a [u8]),
    /// The mode needs an argument it did not get, or got a bad one.
    BadArgument { mode: &'static str, arg: Option<&'a [u8]> },
    /// More arguments than the mode takes.
    Extra(&'a [u8]),
}

impl fmt::Display for UsageError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UsageError::Missing => write!(f, "no mode given; {USAGE}"),
            UsageError::UnknownMode(m) => write!(f, "unknown mode `{}`; {USAGE}", text(m)),
            UsageError::BadArgument { mode, arg: None } => {
                write!(f, "`{mode}` needs an argument; {USAGE}")
            }
            UsageError::BadArgument { mode, arg: Some(a) } => {
                write!(f, "`{mode}`: bad argument `{}`; {USAGE}", text(a))
            }
            UsageError::Extra(a) => write!(f, "unexpected argument `{}`; {USAGE}", text(a)),
        }
    }
}

fn text(bytes: &[u8]) -> &str {
    core::str::from_utf8(bytes).unwrap_or("<not UTF-8>")
}

/// What an image built without the `test-modes` feature (the `cella-scanner` image the service
/// runs) says when asked for one.
pub const NO_TEST_MODES: &str = "this image has no test modes (fault, spin, flood, heap-hash, fill-canary, \
                                 read-disk, vsock-echo, vsock-serve, hostile, helper): they are in \
                                 the cella-runner and cella-scanner-test images";

/// One line of usage, printed with every usage error.
pub const USAGE: &str = "modes: hello | exit N | fault | spin | fill-canary | heap-hash | flood N | \
                         read-disk | vsock-echo PORT | vsock-serve PORT | hostile KIND | \
                         helper sum|fault|spin | scan | \
                         template | session SIZE deny|redact|allow NAME";

impl<'a> Mode<'a> {
    /// Parses the runner's arguments (without a program name).
    pub fn parse<I>(args: I) -> Result<Mode<'a>, UsageError<'a>>
    where
        I: IntoIterator<Item = &'a [u8]>,
    {
        let mut args = args.into_iter();
        let mode = match args.next().ok_or(UsageError::Missing)? {
            b"hello" => Mode::Hello,
            b"fault" => Mode::Fault,
            b"spin" => Mode::Spin,
            b"fill-canary" => Mode::FillCanary,
            b"heap-hash" => Mode::HeapHash,
            b"template" => Mode::Template,
            b"exit" => Mode::Exit(number(args.next(), "exit")?),
            b"flood" => Mode::Flood(number(args.next(), "flood")?),
            b"read-disk" => Mode::ReadDisk,
            b"scan" => Mode::Scan,
            b"session" => {
                let size = args.next();
                let artifact_size = size
                    .and_then(|a| core::str::from_utf8(a).ok())
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or(UsageError::BadArgument { mode: "session", arg: size })?;
                let policy = args.next();
                let read_policy = policy
                    .and_then(ReadPolicy::parse)
                    .ok_or(UsageError::BadArgument { mode: "session", arg: policy })?;
                let name = args.next();
                let artifact_name = name
                    .and_then(|a| core::str::from_utf8(a).ok())
                    .filter(|n| !n.is_empty())
                    .ok_or(UsageError::BadArgument { mode: "session", arg: name })?;
                Mode::Session(SessionArgs { artifact_size, read_policy, artifact_name })
            }
            b"vsock-echo" => Mode::VsockEcho(number(args.next(), "vsock-echo")?),
            b"vsock-serve" => Mode::VsockServe(number(args.next(), "vsock-serve")?),
            b"hostile" => {
                let arg = args.next();
                let kind = Hostile::ALL.iter().find(|(name, _)| Some(*name) == arg);
                Mode::Hostile(kind.ok_or(UsageError::BadArgument { mode: "hostile", arg })?.1)
            }
            b"helper" => {
                let arg = args.next();
                let kind = HelperTest::ALL.iter().find(|(name, _)| Some(*name) == arg);
                Mode::Helper(kind.ok_or(UsageError::BadArgument { mode: "helper", arg })?.1)
            }
            other => return Err(UsageError::UnknownMode(other)),
        };
        match args.next() {
            Some(extra) => Err(UsageError::Extra(extra)),
            None => Ok(mode),
        }
    }
}

fn number<'a>(arg: Option<&'a [u8]>, mode: &'static str) -> Result<u32, UsageError<'a>> {
    arg.and_then(|a| core::str::from_utf8(a).ok())
        .and_then(|s| s.parse::<u32>().ok())
        .ok_or(UsageError::BadArgument { mode, arg })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&'static str]) -> Result<Mode<'static>, UsageError<'static>> {
        Mode::parse(args.iter().map(|a| a.as_bytes()))
    }

    #[test]
    fn parses_every_mode() {
        assert_eq!(parse(&["hello"]), Ok(Mode::Hello));
        assert_eq!(parse(&["exit", "7"]), Ok(Mode::Exit(7)));
        assert_eq!(parse(&["fault"]), Ok(Mode::Fault));
        assert_eq!(parse(&["spin"]), Ok(Mode::Spin));
        assert_eq!(parse(&["fill-canary"]), Ok(Mode::FillCanary));
        assert_eq!(parse(&["heap-hash"]), Ok(Mode::HeapHash));
        assert_eq!(parse(&["template"]), Ok(Mode::Template));
        assert_eq!(parse(&["template", "x"]), Err(UsageError::Extra(b"x")));
        assert_eq!(parse(&["flood", "20"]), Ok(Mode::Flood(20)));
        assert_eq!(parse(&["read-disk"]), Ok(Mode::ReadDisk));
        assert_eq!(parse(&["vsock-echo", "1024"]), Ok(Mode::VsockEcho(1024)));
        assert_eq!(parse(&["hostile", "loop-chain"]), Ok(Mode::Hostile(Hostile::LoopChain)));
        assert!(parse(&["hostile", "nice"]).is_err());
        assert_eq!(parse(&["helper", "sum"]), Ok(Mode::Helper(HelperTest::Sum)));
        assert_eq!(parse(&["helper", "spin"]), Ok(Mode::Helper(HelperTest::Spin)));
        assert!(parse(&["helper"]).is_err());
    }

    #[test]
    fn refuses_bad_arguments_with_the_reason() {
        assert_eq!(parse(&[]), Err(UsageError::Missing));
        assert_eq!(parse(&["jump"]), Err(UsageError::UnknownMode(b"jump")));
        assert_eq!(
            parse(&["exit", "seven"]),
            Err(UsageError::BadArgument { mode: "exit", arg: Some(b"seven") })
        );
        assert_eq!(parse(&["exit"]), Err(UsageError::BadArgument { mode: "exit", arg: None }));
        assert_eq!(parse(&["hello", "x"]), Err(UsageError::Extra(b"x")));
        let text = std::format!("{}", UsageError::UnknownMode(b"jump"));
        assert!(text.starts_with("unknown mode `jump`"), "{text}");
    }

    #[test]
    fn parses_session_arguments() {
        let expected = SessionArgs {
            artifact_size: 1 << 20,
            read_policy: ReadPolicy::Redact,
            artifact_name: "app.tar.gz",
        };
        assert_eq!(parse(&["session", "1048576", "redact", "app.tar.gz"]), Ok(Mode::Session(expected)));
        assert_eq!(
            parse(&["session", "0", "deny", "x"]),
            Ok(Mode::Session(SessionArgs {
                artifact_size: 0,
                read_policy: ReadPolicy::Deny,
                artifact_name: "x"
            }))
        );
        assert!(
            matches!(parse(&["session", "1", "allow", "x"]), Ok(Mode::Session(a)) if a.read_policy == ReadPolicy::Allow)
        );
    }

    #[test]
    fn refuses_bad_session_arguments_naming_the_argument() {
        let bad = |arg: Option<&'static [u8]>| Err(UsageError::BadArgument { mode: "session", arg });
        assert_eq!(parse(&["session"]), bad(None));
        assert_eq!(parse(&["session", "-1", "deny", "x"]), bad(Some(b"-1")));
        assert_eq!(parse(&["session", "10", "maybe", "x"]), bad(Some(b"maybe")));
        assert_eq!(parse(&["session", "10", "deny"]), bad(None));
        assert_eq!(parse(&["session", "10", "deny", "x", "y"]), Err(UsageError::Extra(b"y")));
        let text = std::format!("{}", UsageError::BadArgument { mode: "session", arg: Some(b"maybe") });
        assert!(text.contains("session SIZE deny|redact|allow NAME"), "{text}");
    }
}
