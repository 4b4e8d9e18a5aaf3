//! Running `ip` and friends, turning failures into errors that carry the command line.

use std::process::{Command, Output};

use super::NetError;

/// A `Command` that runs `program` inside network namespace `ns`.
///
/// Lab hosts are namespaces, so anything that must run "on a host" (QEMU, `busybox ping`, an
/// agent) goes through `ip netns exec`, which also gives the process a `/sys` matching the
/// namespace. Add arguments to the returned command as usual.
pub fn netns_command(ns: &str, program: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, program]);
    cmd
}

/// Renders a command line for error messages and logs.
pub(crate) fn cmdline(program: &str, args: &[&str]) -> String {
    std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `program args...` to completion and returns its output, whatever its exit status.
fn output(program: &str, args: &[&str]) -> Result<Output, NetError> {
    tracing::debug!(cmd = %cmdline(program, args), "lab command");
    Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| NetError::Command {
            cmdline: cmdline(program, args),
            stderr: format!("could not start: {e}"),
        })
}

/// Runs `program args...`; a non-zero exit becomes `NetError::Command` with its stderr.
pub(crate) fn run(program: &str, args: &[&str]) -> Result<String, NetError> {
    let out = output(program, args)?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if stderr.is_empty() {
        stderr = format!("exited with {}", out.status);
    }
    Err(NetError::Command {
        cmdline: cmdline(program, args),
        stderr,
    })
}

/// Runs `ip args...`.
pub(crate) fn ip(args: &[&str]) -> Result<String, NetError> {
    run("ip", args)
}

/// Runs `ip -n ns args...`, i.e. an `ip` command acting inside namespace `ns`.
pub(crate) fn ip_in(ns: &str, args: &[&str]) -> Result<String, NetError> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    ip(&all)
}
