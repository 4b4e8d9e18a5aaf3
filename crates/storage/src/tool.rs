//! The QEMU storage tools (`qemu-img`, `qemu-nbd`) as child processes that never outlive
//! their owner: every child is killed when its handle is dropped (an error, a cancelled task)
//! and, through `PR_SET_PDEATHSIG`, when the process that started it dies, so a crashed agent
//! leaves no export listening and no copy writing. Children that must run in a host's network
//! namespace are started through `ip netns exec`, which replaces itself with the tool (the
//! pid is the tool's).

use std::ffi::OsStr;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

/// What running a tool can fail with. Codes are stable (`storage-tool-*`).
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The binary could not be started (not installed, not executable).
    #[error("cannot run {tool}: {source}")]
    Spawn {
        tool: String,
        #[source]
        source: std::io::Error,
    },
    /// It ran and failed; `stderr` is its own explanation (last lines).
    #[error("{tool} failed ({status}): {stderr}")]
    Failed {
        tool: String,
        status: String,
        stderr: String,
    },
    /// It did not finish within its time limit and was killed.
    #[error("{tool} did not finish within {} s and was killed", .limit.as_secs())]
    Timeout { tool: String, limit: Duration },
}

impl ToolError {
    /// A stable, kebab-case identifier of the error kind.
    pub fn code(&self) -> &'static str {
        match self {
            ToolError::Spawn { .. } => "storage-tool-missing",
            ToolError::Failed { .. } => "storage-tool-failed",
            ToolError::Timeout { .. } => "storage-tool-timeout",
        }
    }

    /// What the operator can do about it.
    pub fn hint(&self) -> &'static str {
        match self {
            ToolError::Spawn { .. } => {
                "install QEMU's tools on the host (Debian: qemu-utils provides qemu-img and qemu-nbd)"
            }
            ToolError::Failed { .. } => {
                "the tool's own message says why; check the image, its lock (no QEMU may use it) \
                 and the datastore's free space"
            }
            ToolError::Timeout { .. } => "check the datastore's health (a hung NFS mount?) and retry",
        }
    }
}

/// A command for `program`, run inside network namespace `netns` when given, with the
/// lifetime rules of this module.
pub(crate) fn command(program: impl AsRef<OsStr>, netns: Option<&str>) -> Command {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: prctl is async-signal-safe and touches only the forked child.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// The tool's name for messages: the program after `ip netns exec NS`, else the program.
pub(crate) fn tool_name(cmd: &Command) -> String {
    let std = cmd.as_std();
    let program = std.get_program().to_string_lossy().into_owned();
    if program == "ip" {
        if let Some(p) = std.get_args().nth(3) {
            return p.to_string_lossy().into_owned();
        }
    }
    program
}

/// Runs `cmd` to its end within `limit`; its stdout on success. Killed on timeout.
pub(crate) async fn run(mut cmd: Command, limit: Duration) -> Result<Vec<u8>, ToolError> {
    let tool = tool_name(&cmd);
    cmd.stdout(Stdio::piped());
    let child = cmd.spawn().map_err(|source| ToolError::Spawn {
        tool: tool.clone(),
        source,
    })?;
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(Ok(out)) if out.status.success() => Ok(out.stdout),
        Ok(Ok(out)) => Err(ToolError::Failed {
            tool,
            status: out.status.to_string(),
            stderr: tail(&out.stderr),
        }),
        Ok(Err(source)) => Err(ToolError::Spawn { tool, source }),
        // Dropping the future dropped the child, which kills it.
        Err(_) => Err(ToolError::Timeout { tool, limit }),
    }
}

/// The last lines of a tool's stderr, trimmed: enough to say why, never a wall of text.
pub(crate) fn tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(4);
    let joined = lines[start..].join(" | ");
    if joined.is_empty() {
        "(no message)".into()
    } else {
        joined
    }
}

/// Whatever the child wrote to stderr so far (it has exited, so this does not block long).
pub(crate) async fn read_stderr(child: &mut Child) -> String {
    let mut buf = Vec::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = tokio::time::timeout(Duration::from_secs(2), err.read_to_end(&mut buf)).await;
    }
    tail(&buf)
}

/// Asks a child to stop (SIGTERM, so `qemu-nbd` flushes and closes its image), waits up to
/// `grace`, then kills it. True when it exited by itself within the grace period.
pub(crate) async fn stop(child: &mut Child, grace: Duration) -> bool {
    if let Ok(Some(_)) = child.try_wait() {
        return true;
    }
    if let Some(pid) = child.id() {
        // SAFETY: plain kill(2) on our own child's pid, which is not reaped yet.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(_) => true,
        Err(_) => {
            let _ = child.kill().await;
            false
        }
    }
}
