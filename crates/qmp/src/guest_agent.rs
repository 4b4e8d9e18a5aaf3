//! A client for qemu-guest-agent (QGA), the daemon inside a guest that answers QMP-style
//! commands over a virtio-serial port.
//!
//! Why a separate client from [`crate::Qmp`]: the agent speaks the same JSON, but the channel
//! behaves differently. There is no greeting and no `id` matching, the host side of the port
//! accepts connections whether or not an agent runs in the guest (requests then go unanswered,
//! or are answered much later when the agent starts), and a previous client may have left
//! replies in the pipe. So every call has a deadline, and every new connection (and every
//! connection after a timeout or a cancelled call) is resynchronised with
//! `guest-sync-delimited`: the client sends a 0xFF byte (which makes the agent drop any
//! half-read request) and the sync request with a random id; the agent answers with a 0xFF
//! byte followed by the id. Everything before a 0xFF, and replies carrying another id, is
//! stale and thrown away.
//!
//! QEMU side (the port name is what Debian's udev rule starts the agent for):
//!
//! ```text
//! -chardev socket,id=qga0,path=RUN/qga.sock,server=on,wait=off
//! -device virtio-serial-pci,id=vser0
//! -device virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0
//! ```
//!
//! ```no_run
//! # async fn demo() -> Result<(), ferry_qmp::guest_agent::GuestAgentError> {
//! use ferry_qmp::GuestAgent;
//! use std::time::Duration;
//! let agent = GuestAgent::new("/run/vm/qga.sock");
//! agent.wait_ready(Duration::from_secs(120)).await?;
//! let os = agent.get_osinfo().await?;
//! let out = agent.run("/bin/uname", &["-r"], Duration::from_secs(10)).await?;
//! println!("{:?} runs {}", os.pretty_name, String::from_utf8_lossy(&out.stdout));
//! # Ok(()) }
//! ```
//!
//! Only the commands Ferry needs are typed; [`GuestAgent::execute_raw`] covers the rest.
//! Replies tolerate unknown members (kept in `extra`) and unknown enum values, because
//! guests run agents older and newer than the QEMU on the host.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::debug;

use crate::commands::{commands, lenient_enum, Command};
use crate::error::excerpt;

/// Default per-call timeout. The agent answers in milliseconds when it runs, but a guest under
/// TCG on a busy host can take seconds; longer waits are asked for explicitly.
pub const DEFAULT_AGENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The sentinel byte of `guest-sync-delimited`; never part of valid UTF-8 JSON.
const SENTINEL: u8 = 0xFF;

/// Largest reply accepted. `guest-exec-status` carries at most 16 MiB of output per stream
/// (the agent's own cap), base64-encoded; anything larger is a broken or hostile peer.
const MAX_REPLY_BYTES: usize = 64 << 20;

/// Each attempt of [`GuestAgent::wait_ready`] waits at most this long for an answer, so that
/// an agent starting up is noticed promptly even if QEMU dropped earlier requests.
const READY_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Pause between attempts of [`GuestAgent::wait_ready`].
const READY_RETRY: Duration = Duration::from_millis(250);

/// How long [`GuestAgent::shutdown`] listens for an error after sending: the agent answers
/// only when the shutdown command failed in the guest.
const SHUTDOWN_ERROR_WAIT: Duration = Duration::from_secs(5);

/// First and longest pause between `guest-exec-status` polls of [`GuestAgent::run`].
const POLL_FIRST: Duration = Duration::from_millis(50);
const POLL_MAX: Duration = Duration::from_millis(500);

/// Everything that can go wrong talking to the guest agent.
///
/// The variants separate what a caller does next: wait and retry ([`NotRunning`], maybe
/// [`Timeout`]), give up on this guest ([`Connect`], [`Closed`]: QEMU is gone), or report
/// the guest's own refusal ([`Guest`]).
///
/// [`NotRunning`]: GuestAgentError::NotRunning
/// [`Timeout`]: GuestAgentError::Timeout
/// [`Connect`]: GuestAgentError::Connect
/// [`Closed`]: GuestAgentError::Closed
/// [`Guest`]: GuestAgentError::Guest
#[derive(Debug, thiserror::Error)]
pub enum GuestAgentError {
    /// The host-side socket could not be connected: QEMU is not running, or was started
    /// without the agent's chardev at this path.
    #[error("cannot connect to the guest agent socket {}: {source}", path.display())]
    Connect {
        /// The socket path tried.
        path: PathBuf,
        /// Why the connection failed.
        #[source]
        source: io::Error,
    },
    /// The socket is there but nothing answered `guest-sync-delimited` in time: no agent in
    /// the guest, or it has not started yet (the guest is still booting).
    #[error("no guest agent answered on {} within {after:?} (not installed or not started yet)", path.display())]
    NotRunning {
        /// The socket path.
        path: PathBuf,
        /// How long we waited.
        after: Duration,
    },
    /// The agent was in sync but did not answer this command in time. The connection is
    /// resynchronised before the next command, so a late reply cannot be mistaken for it.
    #[error("{command} timed out: no reply from the guest agent after {after:?}")]
    Timeout {
        /// The command without an answer.
        command: String,
        /// How long we waited.
        after: Duration,
    },
    /// The agent answered with an error object.
    #[error("{command} failed in the guest: {class}: {desc}")]
    Guest {
        /// The command the agent rejected.
        command: String,
        /// The agent's error class, e.g. `GenericError`, `CommandNotFound`.
        class: String,
        /// The agent's description.
        desc: String,
    },
    /// The agent sent something that is not a valid reply, or a reply that does not fit the
    /// command's typed output.
    #[error("{command}: guest agent protocol error: {detail}")]
    Protocol {
        /// The command that was waiting.
        command: String,
        /// What was wrong, with an excerpt of the offending text.
        detail: String,
    },
    /// The socket was closed (QEMU exited). The next call connects again.
    #[error("guest agent connection closed: QEMU went away")]
    Closed,
    /// Reading or writing the socket failed. The next call connects again.
    #[error("guest agent I/O error: {0}")]
    Io(#[from] io::Error),
}

impl GuestAgentError {
    /// A stable short code for logs and APIs.
    pub fn code(&self) -> &'static str {
        match self {
            GuestAgentError::Connect { .. } => "agent-connect",
            GuestAgentError::NotRunning { .. } => "agent-not-running",
            GuestAgentError::Timeout { .. } => "agent-timeout",
            GuestAgentError::Guest { .. } => "agent-guest-error",
            GuestAgentError::Protocol { .. } => "agent-protocol",
            GuestAgentError::Closed => "agent-closed",
            GuestAgentError::Io(_) => "agent-io",
        }
    }

    /// True for the failures of an agent that may simply not be up yet (booting guest, QEMU
    /// still creating its socket), which [`GuestAgent::wait_ready`] retries.
    pub fn is_transient(&self) -> bool {
        match self {
            GuestAgentError::NotRunning { .. }
            | GuestAgentError::Timeout { .. }
            | GuestAgentError::Closed => true,
            GuestAgentError::Connect { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ),
            GuestAgentError::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
            GuestAgentError::Guest { .. } | GuestAgentError::Protocol { .. } => false,
        }
    }

    /// The agent's error class for [`GuestAgentError::Guest`], e.g. `CommandNotFound` for a
    /// command this agent version does not have or the guest's policy disabled.
    pub fn class(&self) -> Option<&str> {
        match self {
            GuestAgentError::Guest { class, .. } => Some(class),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Typed commands (qga/qapi-schema.json)
// ---------------------------------------------------------------------------------------

/// `guest-ping`: succeeds when the agent is alive.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct GuestPing;

/// `guest-info`: the agent's version and commands.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct GuestInfo;

/// One command the agent knows (`GuestAgentCommandInfo`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct AgentCommandInfo {
    /// Command name.
    pub name: String,
    /// False when the guest's configuration disabled it.
    #[serde(default)]
    pub enabled: bool,
    /// False for commands that send no reply on success (`guest-shutdown`).
    #[serde(default)]
    pub success_response: bool,
    /// Members this code does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Reply of `guest-info`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct AgentInfo {
    /// The agent's version, e.g. `7.2.22`.
    pub version: String,
    /// Commands the agent knows.
    #[serde(default, alias = "supported_commands")]
    pub supported_commands: Vec<AgentCommandInfo>,
    /// Members this code does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl AgentInfo {
    /// True when the agent has `command` and it is enabled, to use optional commands only
    /// where they exist.
    pub fn supports(&self, command: &str) -> bool {
        self.supported_commands
            .iter()
            .any(|c| c.name == command && c.enabled)
    }
}

/// `guest-get-osinfo`: what the guest runs (from its os-release and uname).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct GuestGetOsinfo;

/// Reply of `guest-get-osinfo`. Every member is optional in the schema (an os-release may
/// lack any of them).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct OsInfo {
    /// os-release `ID`, e.g. `debian`.
    pub id: Option<String>,
    /// os-release `NAME`, e.g. `Debian GNU/Linux`.
    pub name: Option<String>,
    /// os-release `PRETTY_NAME`, e.g. `Debian GNU/Linux 12 (bookworm)`.
    pub pretty_name: Option<String>,
    /// os-release `VERSION`, e.g. `12 (bookworm)`.
    pub version: Option<String>,
    /// os-release `VERSION_ID`, e.g. `12`.
    pub version_id: Option<String>,
    /// `uname -r`, e.g. `6.1.0-57-cloud-amd64`.
    pub kernel_release: Option<String>,
    /// `uname -v`.
    pub kernel_version: Option<String>,
    /// `uname -m`, e.g. `x86_64`.
    pub machine: Option<String>,
    /// Members this code does not model (`variant`, `variant-id`, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `guest-network-get-interfaces`: the guest's interfaces and addresses.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct GuestNetworkGetInterfaces;

lenient_enum! {
    /// The address family of a [`GuestIpAddress`].
    pub enum IpAddressType {
        /// IPv4.
        Ipv4 => "ipv4",
        /// IPv6.
        Ipv6 => "ipv6",
    }
}

/// One address of a [`GuestNetworkInterface`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestIpAddress {
    /// The address in text form.
    pub ip_address: String,
    /// The address family.
    pub ip_address_type: IpAddressType,
    /// Prefix length (netmask bits).
    pub prefix: u32,
    /// Members this code does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One interface of `guest-network-get-interfaces`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestNetworkInterface {
    /// Interface name in the guest, e.g. `ens3`.
    pub name: String,
    /// MAC address; absent for interfaces without one.
    #[serde(default)]
    pub hardware_address: Option<String>,
    /// Addresses; absent when the interface has none.
    #[serde(default)]
    pub ip_addresses: Vec<GuestIpAddress>,
    /// Members this code does not model (`statistics`, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

lenient_enum! {
    /// How `guest-shutdown` stops the guest.
    pub enum ShutdownMode {
        /// Power off (ACPI): QEMU exits unless run with `-no-shutdown`.
        Powerdown => "powerdown",
        /// Halt the CPUs without powering off.
        Halt => "halt",
        /// Reboot.
        Reboot => "reboot",
    }
}

/// `guest-shutdown`. Sent by [`GuestAgent::shutdown`], which knows that a successful
/// shutdown has no reply.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GuestShutdown {
    /// The mode; the agent's default is `powerdown`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<ShutdownMode>,
}

/// `guest-exec`: starts a program in the guest and returns its pid at once.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestExec {
    /// Absolute path of the program (no shell: run `/bin/sh -c` for one).
    pub path: String,
    /// Arguments, without `argv[0]`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub arg: Vec<String>,
    /// Environment as `NAME=value`; empty inherits the agent's.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// Standard input, base64-encoded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_data: Option<String>,
    /// Keep stdout and stderr for `guest-exec-status`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capture_output: Option<bool>,
}

/// Reply of `guest-exec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestExecPid {
    /// The process id in the guest, for `guest-exec-status`.
    pub pid: i64,
}

/// `guest-exec-status`: whether a `guest-exec` process ended, and its output.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct GuestExecStatus {
    /// The pid `guest-exec` returned.
    pub pid: i64,
}

/// Reply of `guest-exec-status` as the agent sends it (output base64-encoded); see
/// [`ExecStatus`] for the decoded form.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestExecStatusInfo {
    /// The process has ended; the other members are only meaningful then.
    pub exited: bool,
    /// Exit code, when it exited normally.
    pub exitcode: Option<i64>,
    /// Signal number, when a signal ended it.
    pub signal: Option<i64>,
    /// Captured stdout, base64.
    pub out_data: Option<String>,
    /// Captured stderr, base64.
    pub err_data: Option<String>,
    /// The agent cut stdout at its limit.
    pub out_truncated: Option<bool>,
    /// The agent cut stderr at its limit.
    pub err_truncated: Option<bool>,
    /// Members this code does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

commands! {
    GuestPing => "guest-ping" -> ();
    GuestInfo => "guest-info" -> AgentInfo;
    GuestGetOsinfo => "guest-get-osinfo" -> OsInfo;
    GuestNetworkGetInterfaces => "guest-network-get-interfaces" -> Vec<GuestNetworkInterface>;
    GuestExec => "guest-exec" -> GuestExecPid;
    GuestExecStatus => "guest-exec-status" -> GuestExecStatusInfo;
}

/// A `guest-exec` process's state with its output decoded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecStatus {
    /// The process has ended.
    pub exited: bool,
    /// Exit code, when it exited normally.
    pub exit_code: Option<i64>,
    /// Signal number, when a signal ended it.
    pub signal: Option<i64>,
    /// Captured stdout (empty when not captured).
    pub stdout: Vec<u8>,
    /// Captured stderr (empty when not captured).
    pub stderr: Vec<u8>,
    /// Output was cut at the agent's limit.
    pub truncated: bool,
}

impl ExecStatus {
    /// Decodes the agent's reply; invalid base64 is a protocol error.
    pub fn decode(info: GuestExecStatusInfo) -> Result<ExecStatus, GuestAgentError> {
        let decode = |field: &str, data: Option<String>| -> Result<Vec<u8>, GuestAgentError> {
            match data {
                None => Ok(Vec::new()),
                Some(text) => base64::engine::general_purpose::STANDARD
                    .decode(text.trim())
                    .map_err(|e| GuestAgentError::Protocol {
                        command: GuestExecStatus::NAME.into(),
                        detail: format!("{field} is not base64: {e}"),
                    }),
            }
        };
        Ok(ExecStatus {
            exited: info.exited,
            exit_code: info.exitcode,
            signal: info.signal,
            stdout: decode("out-data", info.out_data)?,
            stderr: decode("err-data", info.err_data)?,
            truncated: info.out_truncated.unwrap_or(false) || info.err_truncated.unwrap_or(false),
        })
    }
}

/// The result of [`GuestAgent::run`]: a finished guest process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit code; `None` when a signal ended the process.
    pub exit_code: Option<i64>,
    /// The signal that ended the process, if one did.
    pub signal: Option<i64>,
    /// Captured stdout.
    pub stdout: Vec<u8>,
    /// Captured stderr.
    pub stderr: Vec<u8>,
    /// Output was cut at the agent's limit (16 MiB per stream in QEMU 7.2).
    pub truncated: bool,
}

impl ExecOutput {
    /// True when the process exited with code 0.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }
}

// ---------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------

/// A qemu-guest-agent client on the host-side unix socket of the agent's virtio-serial port.
///
/// Cheap to clone: clones share one connection, and calls take turns on it (the agent
/// answers one request at a time, in order, without ids). The connection is opened by the
/// first call and opened again after QEMU closed it, so a handle can be created before the
/// guest (or QEMU) runs and kept across a guest reboot.
#[derive(Clone)]
pub struct GuestAgent {
    path: Arc<PathBuf>,
    conn: Arc<Mutex<Option<Conn>>>,
    timeout: Duration,
}

impl std::fmt::Debug for GuestAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestAgent")
            .field("path", &self.path)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// One open connection.
struct Conn {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    /// The stream holds nothing unread that belongs to an earlier request. Cleared before
    /// every request and set again once its reply is read, so a timeout or a cancelled call
    /// forces a resync.
    synced: bool,
}

impl GuestAgent {
    /// A client for the agent behind `path`. No I/O happens until the first call.
    pub fn new(path: impl Into<PathBuf>) -> GuestAgent {
        GuestAgent {
            path: Arc::new(path.into()),
            conn: Arc::new(Mutex::new(None)),
            timeout: DEFAULT_AGENT_TIMEOUT,
        }
    }

    /// Connects and synchronises now, so that a missing socket or agent shows up here rather
    /// than at the first command. Fails with [`GuestAgentError::NotRunning`] when no agent
    /// answered within `timeout`.
    pub async fn connect(
        path: impl Into<PathBuf>,
        timeout: Duration,
    ) -> Result<GuestAgent, GuestAgentError> {
        let agent = GuestAgent::new(path).with_timeout(timeout);
        agent.sync().await?;
        Ok(agent)
    }

    /// Returns this handle with another per-call timeout (default 10 s); other clones keep
    /// theirs.
    pub fn with_timeout(self, timeout: Duration) -> Self {
        GuestAgent { timeout, ..self }
    }

    /// The per-call timeout of this handle.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The socket path, for log messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Resynchronises the connection (connecting first if needed) with
    /// `guest-sync-delimited`, even if it looks in sync.
    pub async fn sync(&self) -> Result<(), GuestAgentError> {
        let deadline = Instant::now() + self.timeout;
        let mut guard = self.lock(deadline, "guest-sync-delimited").await?;
        if let Some(conn) = guard.as_mut() {
            conn.synced = false;
        }
        let result = self.ready_conn(&mut guard, deadline).await.map(|_| ());
        self.forget_if_broken(&mut guard, &result);
        result
    }

    /// Polls the agent with `guest-ping` until it answers or `within` has passed: the way to
    /// wait for a booting guest. Transient failures (no socket yet, no agent yet, timeouts)
    /// are retried; the last one is returned when time runs out. Returns how long it took.
    pub async fn wait_ready(&self, within: Duration) -> Result<Duration, GuestAgentError> {
        let started = Instant::now();
        let deadline = started + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = self
                .clone()
                .with_timeout(READY_ATTEMPT_TIMEOUT.min(self.timeout).min(left));
            match attempt.ping().await {
                Ok(()) => return Ok(started.elapsed()),
                Err(e) if e.is_transient() && Instant::now() + READY_RETRY < deadline => {
                    debug!(error = %e, "guest agent not ready yet");
                    tokio::time::sleep(READY_RETRY).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `guest-ping`.
    pub async fn ping(&self) -> Result<(), GuestAgentError> {
        self.execute(&GuestPing).await
    }

    /// `guest-info`: the agent's version and supported commands.
    pub async fn info(&self) -> Result<AgentInfo, GuestAgentError> {
        self.execute(&GuestInfo).await
    }

    /// `guest-get-osinfo`: distribution and kernel of the guest.
    pub async fn get_osinfo(&self) -> Result<OsInfo, GuestAgentError> {
        self.execute(&GuestGetOsinfo).await
    }

    /// `guest-network-get-interfaces`: names, MAC and IP addresses of the guest's interfaces.
    pub async fn network_get_interfaces(
        &self,
    ) -> Result<Vec<GuestNetworkInterface>, GuestAgentError> {
        self.execute(&GuestNetworkGetInterfaces).await
    }

    /// `guest-shutdown`. A shutdown that works has no reply (the agent goes down with the
    /// guest), so the socket closing, or silence for a few seconds, count as sent; only an
    /// error reply (the guest's shutdown command failed) is an error. Whether the guest
    /// really stops is for the caller to watch (QEMU exiting, `SHUTDOWN` event).
    pub async fn shutdown(&self, mode: ShutdownMode) -> Result<(), GuestAgentError> {
        const NAME: &str = "guest-shutdown";
        let args = command_args(
            NAME,
            &GuestShutdown {
                mode: Some(mode.clone()),
            },
        )?;
        let deadline = Instant::now() + self.timeout;
        let mut guard = self.lock(deadline, NAME).await?;
        let conn = match self.ready_conn(&mut guard, deadline).await {
            Ok(conn) => conn,
            Err(e) => {
                if is_broken(&e) {
                    *guard = None;
                }
                return Err(e);
            }
        };
        conn.synced = false;
        let wait = SHUTDOWN_ERROR_WAIT.min(deadline.saturating_duration_since(Instant::now()));
        let result = match conn.send(NAME, args.as_ref()).await {
            Err(e) => Err(e),
            Ok(()) => match tokio::time::timeout(wait, conn.read_reply(NAME)).await {
                // Silence: the request went out and the guest is (presumably) going down.
                Err(_) => Ok(()),
                // The agent, the guest and QEMU went away: what a powerdown looks like.
                Ok(Err(GuestAgentError::Closed | GuestAgentError::Io(_))) => {
                    debug!(%mode, "guest agent socket closed after guest-shutdown");
                    *guard = None;
                    return Ok(());
                }
                Ok(Err(e)) => Err(e),
                Ok(Ok(msg)) => interpret_reply(NAME, msg).map(|_| ()),
            },
        };
        self.forget_if_broken(&mut guard, &result);
        result
    }

    /// `guest-exec`: starts `path` with `args` in the guest and returns its pid; with
    /// `capture_output` its stdout and stderr are kept for [`GuestAgent::exec_status`].
    pub async fn exec(
        &self,
        path: &str,
        args: &[&str],
        capture_output: bool,
    ) -> Result<i64, GuestAgentError> {
        let cmd = GuestExec {
            path: path.to_string(),
            arg: args.iter().map(|a| a.to_string()).collect(),
            capture_output: Some(capture_output),
            ..GuestExec::default()
        };
        Ok(self.execute(&cmd).await?.pid)
    }

    /// `guest-exec-status` with the output decoded from base64.
    pub async fn exec_status(&self, pid: i64) -> Result<ExecStatus, GuestAgentError> {
        ExecStatus::decode(self.execute(&GuestExecStatus { pid }).await?)
    }

    /// Runs a program in the guest to completion: `guest-exec` with captured output, then
    /// `guest-exec-status` until it exits. Fails with [`GuestAgentError::Timeout`] when it
    /// has not exited within `timeout`; the process then keeps running in the guest (the
    /// agent has no kill command).
    pub async fn run(
        &self,
        path: &str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<ExecOutput, GuestAgentError> {
        let deadline = Instant::now() + timeout;
        let pid = self.exec(path, args, true).await?;
        let mut pause = POLL_FIRST;
        loop {
            let status = self.exec_status(pid).await?;
            if status.exited {
                return Ok(ExecOutput {
                    exit_code: status.exit_code,
                    signal: status.signal,
                    stdout: status.stdout,
                    stderr: status.stderr,
                    truncated: status.truncated,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(GuestAgentError::Timeout {
                    command: format!("guest-exec {path} (pid {pid})"),
                    after: timeout,
                });
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(POLL_MAX);
        }
    }

    /// Runs a typed command and decodes its reply.
    pub async fn execute<C: Command>(&self, cmd: &C) -> Result<C::Output, GuestAgentError> {
        let args = command_args(C::NAME, cmd)?;
        let ret = self.execute_raw(C::NAME, args).await?;
        decode_return(C::NAME, ret)
    }

    /// Runs any agent command (`args`, when given, must be a JSON object) and returns its
    /// `return` value. Not for `guest-shutdown` and other commands without a success reply:
    /// they would time out (use [`GuestAgent::shutdown`]).
    pub async fn execute_raw(
        &self,
        command: &str,
        args: Option<Value>,
    ) -> Result<Value, GuestAgentError> {
        if let Some(other) = args.as_ref().filter(|a| !a.is_object()) {
            return Err(GuestAgentError::Protocol {
                command: command.to_string(),
                detail: format!(
                    "arguments must be a JSON object, not {}",
                    excerpt(&other.to_string())
                ),
            });
        }
        let deadline = Instant::now() + self.timeout;
        let mut guard = self.lock(deadline, command).await?;
        let result = self
            .call(&mut guard, command, args.as_ref(), deadline)
            .await;
        self.forget_if_broken(&mut guard, &result);
        result
    }

    async fn call(
        &self,
        guard: &mut Option<Conn>,
        command: &str,
        args: Option<&Value>,
        deadline: Instant,
    ) -> Result<Value, GuestAgentError> {
        let conn = self.ready_conn(guard, deadline).await?;
        conn.synced = false;
        conn.send(command, args).await?;
        let wait = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(wait, conn.read_reply(command))
            .await
            .map_err(|_| GuestAgentError::Timeout {
                command: command.to_string(),
                after: self.timeout,
            })??;
        conn.synced = true;
        interpret_reply(command, msg)
    }

    async fn lock(
        &self,
        deadline: Instant,
        command: &str,
    ) -> Result<tokio::sync::MutexGuard<'_, Option<Conn>>, GuestAgentError> {
        tokio::time::timeout_at(deadline, self.conn.lock())
            .await
            .map_err(|_| GuestAgentError::Timeout {
                command: format!("{command} (waiting for another call on the agent)"),
                after: self.timeout,
            })
    }

    /// The open, synchronised connection, connecting and syncing as needed before `deadline`.
    /// A connection kept from an earlier call may have been closed by QEMU since (QEMU
    /// restarted): then one fresh connection is tried.
    async fn ready_conn<'a>(
        &self,
        guard: &'a mut Option<Conn>,
        deadline: Instant,
    ) -> Result<&'a mut Conn, GuestAgentError> {
        let reused = guard.is_some();
        if let Err(e) = self.prepare(guard, deadline).await {
            if !(reused && is_broken(&e)) {
                return Err(e);
            }
            debug!(error = %e, "guest agent connection went stale; connecting again");
            *guard = None;
            self.prepare(guard, deadline).await?;
        }
        guard.as_mut().ok_or(GuestAgentError::Closed)
    }

    async fn prepare(
        &self,
        guard: &mut Option<Conn>,
        deadline: Instant,
    ) -> Result<(), GuestAgentError> {
        // Between calls nothing should arrive. A closed socket (QEMU restarted) means a new
        // connection; unread bytes (a late reply) mean the stream must be resynchronised.
        if let Some(conn) = guard.as_mut().filter(|c| c.synced) {
            match conn.probe().await {
                Probe::Idle => {}
                Probe::Unread => conn.synced = false,
                Probe::Closed => *guard = None,
            }
        }
        if guard.is_none() {
            let stream = UnixStream::connect(&*self.path).await.map_err(|source| {
                GuestAgentError::Connect {
                    path: self.path.to_path_buf(),
                    source,
                }
            })?;
            let (r, w) = stream.into_split();
            *guard = Some(Conn {
                reader: BufReader::new(r),
                writer: w,
                synced: false,
            });
        }
        let Some(conn) = guard.as_mut() else {
            return Err(GuestAgentError::Closed);
        };
        if conn.synced {
            return Ok(());
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(wait, conn.sync(next_sync_id())).await {
            Err(_) => Err(GuestAgentError::NotRunning {
                path: self.path.to_path_buf(),
                after: self.timeout,
            }),
            Ok(result) => {
                result?;
                conn.synced = true;
                Ok(())
            }
        }
    }

    /// Drops the connection after errors that leave it unusable, so the next call connects
    /// again (QEMU may have been restarted with a new socket).
    fn forget_if_broken<T>(&self, guard: &mut Option<Conn>, result: &Result<T, GuestAgentError>) {
        if result.as_ref().is_err_and(is_broken) {
            *guard = None;
        }
    }
}

/// What [`Conn::probe`] saw on an idle connection.
enum Probe {
    Idle,
    Unread,
    Closed,
}

impl Conn {
    /// Looks at the socket without waiting.
    async fn probe(&mut self) -> Probe {
        // `timeout` polls the read once before looking at the (already expired) deadline.
        match tokio::time::timeout(Duration::ZERO, self.reader.fill_buf()).await {
            Err(_) => Probe::Idle,
            Ok(Ok([])) | Ok(Err(_)) => Probe::Closed,
            Ok(Ok(_)) => Probe::Unread,
        }
    }

    /// Sends `<0xFF>{"execute":"guest-sync-delimited","arguments":{"id":ID}}` and reads until
    /// a sentinel followed by the reply carrying `id`, discarding everything else.
    async fn sync(&mut self, id: u64) -> Result<(), GuestAgentError> {
        const NAME: &str = "guest-sync-delimited";
        let mut line = vec![SENTINEL];
        line.extend_from_slice(
            json!({"execute": NAME, "arguments": {"id": id}})
                .to_string()
                .as_bytes(),
        );
        line.push(b'\n');
        self.write(&line).await?;
        loop {
            let skipped = skip_past_sentinel(&mut self.reader).await?;
            if skipped > 0 {
                debug!(bytes = skipped, "stale guest agent output discarded");
            }
            let reply = read_line_limited(&mut self.reader, MAX_REPLY_BYTES).await?;
            let text = String::from_utf8_lossy(&reply);
            match serde_json::from_str::<Value>(text.trim()) {
                Ok(v) if v.get("return").and_then(Value::as_u64) == Some(id) => return Ok(()),
                // A late answer to an earlier sync (another id), or an error the agent sent
                // for the garbage it was flushing: keep looking.
                _ => debug!(line = %excerpt(text.trim()), "stale sync reply skipped"),
            }
        }
    }

    async fn send(&mut self, command: &str, args: Option<&Value>) -> Result<(), GuestAgentError> {
        let mut msg = Map::new();
        msg.insert("execute".into(), json!(command));
        if let Some(a) = args {
            msg.insert("arguments".into(), a.clone());
        }
        let mut line = Value::Object(msg).to_string().into_bytes();
        line.push(b'\n');
        debug!(command, "guest agent send");
        self.write(&line).await
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), GuestAgentError> {
        match self.writer.write_all(bytes).await {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::NotConnected
                ) =>
            {
                Err(GuestAgentError::Closed)
            }
            Err(e) => Err(GuestAgentError::Io(e)),
        }
    }

    /// The next reply object. Blank lines and stray sentinels are skipped.
    async fn read_reply(&mut self, command: &str) -> Result<Value, GuestAgentError> {
        loop {
            let line = read_line_limited(&mut self.reader, MAX_REPLY_BYTES).await?;
            let start = line
                .iter()
                .position(|b| *b != SENTINEL)
                .unwrap_or(line.len());
            let text = String::from_utf8_lossy(&line[start..]);
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            return serde_json::from_str::<Value>(text).map_err(|e| GuestAgentError::Protocol {
                command: command.to_string(),
                detail: format!("not JSON ({e}): {}", excerpt(text)),
            });
        }
    }
}

/// Errors after which the connection cannot be trusted: dropped, so the next call connects
/// again (QEMU may have been restarted and made a new socket).
fn is_broken(e: &GuestAgentError) -> bool {
    matches!(
        e,
        GuestAgentError::Closed | GuestAgentError::Io(_) | GuestAgentError::Protocol { .. }
    )
}

/// Consumes input up to and including the next sentinel byte; returns how many bytes before
/// it were thrown away.
async fn skip_past_sentinel<R: AsyncBufRead + Unpin>(
    reader: &mut R,
) -> Result<usize, GuestAgentError> {
    let mut skipped = 0;
    loop {
        let buf = reader.fill_buf().await.map_err(read_error)?;
        if buf.is_empty() {
            return Err(GuestAgentError::Closed);
        }
        match buf.iter().position(|b| *b == SENTINEL) {
            Some(i) => {
                reader.consume(i + 1);
                return Ok(skipped + i);
            }
            None => {
                let n = buf.len();
                reader.consume(n);
                skipped += n;
            }
        }
    }
}

/// One `\n`-terminated line (without the newline), at most `limit` bytes.
async fn read_line_limited<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    limit: usize,
) -> Result<Vec<u8>, GuestAgentError> {
    let mut line = Vec::new();
    loop {
        let buf = reader.fill_buf().await.map_err(read_error)?;
        if buf.is_empty() {
            return Err(GuestAgentError::Closed);
        }
        let (take, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        line.extend_from_slice(&buf[..take]);
        reader.consume(take);
        if line.len() > limit {
            return Err(GuestAgentError::Protocol {
                command: "guest agent reply".into(),
                detail: format!("reply longer than {limit} bytes"),
            });
        }
        if done {
            line.pop();
            return Ok(line);
        }
    }
}

fn read_error(e: io::Error) -> GuestAgentError {
    if e.kind() == io::ErrorKind::ConnectionReset {
        GuestAgentError::Closed
    } else {
        GuestAgentError::Io(e)
    }
}

/// A random positive id for `guest-sync-delimited` (std's hasher keys are random per
/// process; the counter makes ids of one process differ).
fn next_sync_id() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    // The agent takes an int64; stay well inside it and away from 0.
    (h.finish() >> 12) | 1
}

fn command_args<C: Serialize>(command: &str, cmd: &C) -> Result<Option<Value>, GuestAgentError> {
    let args = serde_json::to_value(cmd).map_err(|e| GuestAgentError::Protocol {
        command: command.to_string(),
        detail: format!("cannot serialize arguments: {e}"),
    })?;
    Ok(match args {
        Value::Null => None,
        Value::Object(m) if m.is_empty() => None,
        other => Some(other),
    })
}

/// `{"return": v}` gives `v`, `{"error": {...}}` a [`GuestAgentError::Guest`].
fn interpret_reply(command: &str, msg: Value) -> Result<Value, GuestAgentError> {
    let Value::Object(mut msg) = msg else {
        return Err(GuestAgentError::Protocol {
            command: command.to_string(),
            detail: format!("expected a JSON object: {}", excerpt(&msg.to_string())),
        });
    };
    if let Some(ret) = msg.remove("return") {
        return Ok(ret);
    }
    let err = msg.get("error");
    let class = err.and_then(|e| e.get("class")).and_then(Value::as_str);
    let desc = err.and_then(|e| e.get("desc")).and_then(Value::as_str);
    match (class, desc) {
        (Some(class), Some(desc)) => Err(GuestAgentError::Guest {
            command: command.to_string(),
            class: class.to_string(),
            desc: desc.to_string(),
        }),
        _ => Err(GuestAgentError::Protocol {
            command: command.to_string(),
            detail: format!(
                "neither return nor error: {}",
                excerpt(&Value::Object(msg).to_string())
            ),
        }),
    }
}

/// Decodes a `return` value; `{}` is accepted for unit outputs.
fn decode_return<T: serde::de::DeserializeOwned>(
    command: &str,
    ret: Value,
) -> Result<T, GuestAgentError> {
    match T::deserialize(&ret) {
        Ok(v) => Ok(v),
        Err(e) => {
            if ret.as_object().is_some_and(Map::is_empty) {
                if let Ok(v) = T::deserialize(Value::Null) {
                    return Ok(v);
                }
            }
            Err(GuestAgentError::Protocol {
                command: command.to_string(),
                detail: format!(
                    "cannot decode reply: {e}; reply was {}",
                    excerpt(&ret.to_string())
                ),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_copied_from_qemu_7_2_decode() {
        let os: OsInfo = serde_json::from_value(json!({"name": "Debian GNU/Linux",
            "kernel-release": "6.1.0-57-cloud-amd64", "version": "12 (bookworm)",
            "pretty-name": "Debian GNU/Linux 12 (bookworm)", "version-id": "12",
            "kernel-version": "#1 SMP PREEMPT_DYNAMIC Debian 6.1.192-3", "machine": "x86_64",
            "id": "debian", "variant-id": "future"}))
        .unwrap();
        assert_eq!(os.id.as_deref(), Some("debian"));
        assert_eq!(os.kernel_release.as_deref(), Some("6.1.0-57-cloud-amd64"));
        assert_eq!(os.extra["variant-id"], "future");

        let ifs: Vec<GuestNetworkInterface> = serde_json::from_value(json!([{"name": "lo",
            "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8},
                             {"ip-address-type": "ipv9", "ip-address": "::1", "prefix": 128}],
            "statistics": {"tx-packets": 0}, "hardware-address": "00:00:00:00:00:00"},
            {"name": "ens3"}]))
        .unwrap();
        assert_eq!(ifs[0].ip_addresses[0].prefix, 8);
        assert_eq!(ifs[0].ip_addresses[0].ip_address_type, IpAddressType::Ipv4);
        assert_eq!(
            ifs[0].ip_addresses[1].ip_address_type,
            IpAddressType::Other("ipv9".into())
        );
        assert!(ifs[1].ip_addresses.is_empty() && ifs[1].hardware_address.is_none());
    }

    #[test]
    fn exec_status_decodes_base64_and_rejects_garbage() {
        let info: GuestExecStatusInfo = serde_json::from_value(json!({"exitcode": 3,
            "err-data": "ZXJyCg==", "out-data": "aGkK", "err-truncated": false,
            "out-truncated": false, "exited": true}))
        .unwrap();
        let st = ExecStatus::decode(info).unwrap();
        assert_eq!(
            (st.exit_code, st.stdout.as_slice(), st.stderr.as_slice()),
            (Some(3), &b"hi\n"[..], &b"err\n"[..])
        );
        let bad = GuestExecStatusInfo {
            exited: true,
            out_data: Some("!!!".into()),
            ..Default::default()
        };
        assert_eq!(
            ExecStatus::decode(bad).unwrap_err().code(),
            "agent-protocol"
        );
    }

    #[test]
    fn exec_arguments_use_qga_names() {
        let cmd = GuestExec {
            path: "/bin/sh".into(),
            arg: vec!["-c".into(), "true".into()],
            capture_output: Some(true),
            ..Default::default()
        };
        assert_eq!(
            command_args("guest-exec", &cmd).unwrap().unwrap(),
            json!({"path": "/bin/sh", "arg": ["-c", "true"], "capture-output": true})
        );
        assert_eq!(command_args("guest-ping", &GuestPing).unwrap(), None);
        assert_eq!(
            command_args(
                "guest-shutdown",
                &GuestShutdown {
                    mode: Some(ShutdownMode::Powerdown)
                }
            )
            .unwrap()
            .unwrap(),
            json!({"mode": "powerdown"})
        );
    }

    #[test]
    fn sync_ids_differ_and_stay_positive() {
        let a = next_sync_id();
        let b = next_sync_id();
        assert_ne!(a, b);
        assert!(a > 0 && a < (1 << 53));
    }

    #[test]
    fn replies_are_interpreted() {
        assert_eq!(
            interpret_reply("x", json!({"return": 5})).unwrap(),
            json!(5)
        );
        let e = interpret_reply(
            "x",
            json!({"error": {"class": "GenericError", "desc": "no"}}),
        )
        .unwrap_err();
        assert_eq!(e.class(), Some("GenericError"));
        assert!(e
            .to_string()
            .contains("x failed in the guest: GenericError: no"));
        assert_eq!(
            interpret_reply("x", json!([1])).unwrap_err().code(),
            "agent-protocol"
        );
        assert_eq!(
            interpret_reply("x", json!({"huh": 1})).unwrap_err().code(),
            "agent-protocol"
        );
    }
}
