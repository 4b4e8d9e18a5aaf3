use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use ferry_qmp::{commands, Qmp};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::cmdline::qemu_args;
use crate::spec::InstanceSpec;
use crate::{Accel, QemuError};

/// Where one QEMU process keeps its sockets and logs.
///
/// One directory per process, owned by it: removing the directory is the whole cleanup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunPaths {
    pub dir: PathBuf,
    pub qmp_socket: PathBuf,
    /// The host end of the guest agent's virtio-serial port.
    pub qga_socket: PathBuf,
    pub serial_socket: PathBuf,
    pub serial_log: PathBuf,
    pub pidfile: PathBuf,
    pub qemu_log: PathBuf,
}

impl RunPaths {
    pub fn in_dir(dir: &Path) -> RunPaths {
        RunPaths {
            dir: dir.to_path_buf(),
            qmp_socket: dir.join("qmp.sock"),
            qga_socket: dir.join("qga.sock"),
            serial_socket: dir.join("serial.sock"),
            serial_log: dir.join("serial.log"),
            pidfile: dir.join("qemu.pid"),
            qemu_log: dir.join("qemu.log"),
        }
    }
}

/// Whether QEMU runs the guest or waits for its state from a migration source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartMode {
    Normal,
    /// `-incoming defer`: the process waits until `migrate-incoming` names the address, which
    /// lets the destination choose a free port and set capabilities first.
    Incoming,
}

/// How and where to start a process, as opposed to what machine it is ([`InstanceSpec`]).
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    pub qemu_binary: PathBuf,
    pub accel: Accel,
    /// Network namespace to run in (a lab host); `None` on a real host.
    pub netns: Option<String>,
    /// The process's own directory; created, and removed when the process is stopped.
    pub run_dir: PathBuf,
    pub mode: StartMode,
    /// How long QEMU may take to open its monitor.
    pub start_timeout: Duration,
    /// Where QEMU appends the guest's serial output, when it must outlive the process (an
    /// agent keeps each instance's console across stops and migrations); `None` puts it in
    /// the run directory, which goes with the process.
    pub serial_log: Option<PathBuf>,
}

impl LaunchOptions {
    pub fn new(run_dir: PathBuf, accel: Accel) -> LaunchOptions {
        LaunchOptions {
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            accel,
            netns: None,
            run_dir,
            mode: StartMode::Normal,
            start_timeout: Duration::from_secs(20),
            serial_log: None,
        }
    }
}

/// A running QEMU process with its monitor connection.
///
/// Dropping it kills the process and removes its run directory, so an error path or a
/// panicking test never leaves a guest behind. A long-lived owner (the host agent) whose
/// guests must outlive it calls [`QemuProcess::set_detached`] instead: then dropping only
/// closes the monitor connection, and a later owner takes the process over with
/// [`QemuProcess::adopt`].
pub struct QemuProcess {
    spec: InstanceSpec,
    paths: RunPaths,
    pid: i32,
    qmp: Qmp,
    exit: watch::Receiver<Option<Exit>>,
    cleaned: bool,
    detached: bool,
}

impl std::fmt::Debug for QemuProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuProcess")
            .field("name", &self.spec.name)
            .field("pid", &self.pid)
            .field("dir", &self.paths.dir)
            .finish()
    }
}

impl QemuProcess {
    /// Starts QEMU for `spec` and connects to its monitor.
    ///
    /// Fails with the tail of QEMU's own output when it exits during start-up (a busy tap, a
    /// bad option), so the caller never has to dig for the reason.
    pub async fn launch(
        spec: &InstanceSpec,
        opts: &LaunchOptions,
    ) -> Result<QemuProcess, QemuError> {
        spec.validate()?;
        let mut paths = RunPaths::in_dir(&opts.run_dir);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| QemuError::Io { path, source }
        };
        if let Some(log) = &opts.serial_log {
            if let Some(parent) = log.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            paths.serial_log = log.clone();
        }
        if paths.dir.exists() {
            std::fs::remove_dir_all(&paths.dir).map_err(io(&paths.dir))?;
        }
        std::fs::create_dir_all(&paths.dir).map_err(io(&paths.dir))?;
        let log = std::fs::File::create(&paths.qemu_log).map_err(io(&paths.qemu_log))?;
        let log2 = log.try_clone().map_err(io(&paths.qemu_log))?;

        let args = qemu_args(spec, opts.accel, &paths, opts.mode);
        let mut cmd = match &opts.netns {
            Some(ns) => {
                let mut c = tokio::process::Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&opts.qemu_binary);
                c
            }
            None => tokio::process::Command::new(&opts.qemu_binary),
        };
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own process group: a Ctrl-C at the terminal reaches Ferry, which then stops
            // its guests in order, instead of killing QEMU behind its back.
            .process_group(0);
        debug!(name = %spec.name, ?args, "starting QEMU");
        let mut child = cmd.spawn().map_err(|source| QemuError::Spawn {
            program: opts.qemu_binary.display().to_string(),
            source,
        })?;
        let pid = child.id().unwrap_or(0) as i32;
        let (tx, exit) = watch::channel(None);
        let log_path = paths.qemu_log.clone();
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(s) => s.to_string(),
                Err(e) => format!("unknown status ({e})"),
            };
            let _ = tx.send(Some(Exit::read(status, &log_path)));
        });

        let connect = Qmp::connect(&paths.qmp_socket, opts.start_timeout);
        let mut exit_rx = exit.clone();
        let qmp = tokio::select! {
            r = connect => r,
            _ = exit_rx.wait_for(|s| s.is_some()) => Err(ferry_qmp::QmpError::Closed),
        };
        let mut process = QemuProcess {
            spec: spec.clone(),
            paths,
            pid,
            qmp: match qmp {
                Ok(q) => q,
                Err(e) => {
                    // Give QEMU a moment to finish writing why it quit.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let ended = exit.borrow().clone();
                    let err = match ended {
                        Some(Exit { status, output }) => QemuError::Exited {
                            name: spec.name.clone(),
                            status,
                            output,
                        },
                        None => QemuError::Qmp(e),
                    };
                    kill_pid(pid);
                    let _ = std::fs::remove_dir_all(&opts.run_dir);
                    return Err(err);
                }
            },
            exit,
            cleaned: false,
            detached: false,
        };
        if let Some(status) = process.exit_status() {
            let output = process.output_tail();
            process.kill();
            return Err(QemuError::Exited {
                name: spec.name.clone(),
                status,
                output,
            });
        }
        Ok(process)
    }

    /// Takes over a QEMU process that this process did not start, or whose owner is gone: an
    /// agent restarted while its guests kept running.
    ///
    /// `pid` must be alive and `run_dir` must hold the monitor socket of that process (the
    /// caller checks that the pid belongs to this guest, e.g. from its pidfile and
    /// `/proc/<pid>/cmdline`). Such a process is not our child, so its exit is noticed by
    /// polling `/proc` rather than by `wait`. Like a launched process, the adopted one is
    /// killed when dropped unless [`QemuProcess::set_detached`] is called.
    pub async fn adopt(
        spec: &InstanceSpec,
        run_dir: &Path,
        pid: i32,
        timeout: Duration,
    ) -> Result<QemuProcess, QemuError> {
        let paths = RunPaths::in_dir(run_dir);
        if !pid_alive(pid) {
            return Err(QemuError::Exited {
                name: spec.name.clone(),
                status: format!("process {pid} is not running"),
                output: tail(&paths.qemu_log, 800),
            });
        }
        let qmp = Qmp::connect(&paths.qmp_socket, timeout).await?;
        let (tx, exit) = watch::channel(None);
        let log_path = paths.qemu_log.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(ADOPTED_EXIT_POLL).await;
                if tx.is_closed() {
                    // Nobody watches any more (the owner dropped the process).
                    return;
                }
                if !pid_alive(pid) {
                    let status = format!("adopted process {pid} exited");
                    let _ = tx.send(Some(Exit::read(status, &log_path)));
                    return;
                }
            }
        });
        debug!(name = %spec.name, pid, "adopted QEMU");
        Ok(QemuProcess {
            spec: spec.clone(),
            paths,
            pid,
            qmp,
            exit,
            cleaned: false,
            detached: false,
        })
    }

    /// With `true`, dropping this value leaves the process running and its run directory in
    /// place (only the monitor connection closes), so the guest survives its owner; explicit
    /// [`QemuProcess::kill`] and [`QemuProcess::shutdown`] still stop it.
    pub fn set_detached(&mut self, detached: bool) {
        self.detached = detached;
    }

    /// Whether dropping leaves the process running (see [`QemuProcess::set_detached`]).
    pub fn is_detached(&self) -> bool {
        self.detached
    }

    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn spec(&self) -> &InstanceSpec {
        &self.spec
    }

    pub fn paths(&self) -> &RunPaths {
        &self.paths
    }

    /// `Some(status)` once the process has exited.
    pub fn exit_status(&self) -> Option<String> {
        self.exit.borrow().as_ref().map(|e| e.status.clone())
    }

    /// How the process ended, with what it printed last (read when it exited, so it
    /// survives the removal of the run directory).
    pub fn exit(&self) -> Option<Exit> {
        self.exit.borrow().clone()
    }

    /// A watch on the exit status that outlives a borrow of the process: an owner that must
    /// not hold its lock while a guest shuts down (seconds) waits on this instead.
    pub fn exit_watch(&self) -> watch::Receiver<Option<Exit>> {
        self.exit.clone()
    }

    /// The last bytes QEMU printed; what to show an operator when it misbehaves.
    pub fn output_tail(&self) -> String {
        tail(&self.paths.qemu_log, 800)
    }

    /// Waits up to `timeout` for the process to exit; `Some(status)` if it did.
    pub async fn wait_exit(&self, timeout: Duration) -> Option<String> {
        let mut rx = self.exit.clone();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|s| s.is_some())).await;
        self.exit_status()
    }

    /// Stops QEMU: `quit` over QMP, then SIGKILL if it has not exited within `timeout`.
    /// Always removes the run directory. Only a [`Shutdown::Clean`] QEMU wrote its caches
    /// (qcow2 metadata included) to its images; the others say why not, for the log.
    pub async fn shutdown(mut self, timeout: Duration) -> Shutdown {
        let outcome = match self.exit_status() {
            Some(status) => Shutdown::Exited(status),
            None => {
                if let Err(e) = self.qmp.execute(&commands::Quit {}).await {
                    debug!(name = %self.spec.name, error = %e, "quit failed; killing");
                }
                match self.wait_exit(timeout).await {
                    Some(status) if status == "exit status: 0" => Shutdown::Clean,
                    Some(status) => Shutdown::Exited(status),
                    None => {
                        warn!(name = %self.spec.name, pid = self.pid, "QEMU ignored quit; killing it");
                        Shutdown::Killed(timeout)
                    }
                }
            }
        };
        self.kill();
        outcome
    }

    /// Kills the process (if still running) and removes its run directory. Idempotent.
    pub fn kill(&mut self) {
        if self.cleaned {
            return;
        }
        if self.exit_status().is_none() {
            kill_pid(self.pid);
        }
        let _ = std::fs::remove_dir_all(&self.paths.dir);
        self.cleaned = true;
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        if !self.detached {
            self.kill();
        }
    }
}

/// How a QEMU process ended: its wait status and the tail of its output, for an operator
/// who must learn why a guest died without digging through a run directory that is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    pub status: String,
    pub output: String,
}

impl Exit {
    fn read(status: String, log: &Path) -> Exit {
        Exit {
            status,
            output: tail(log, 800),
        }
    }
}

/// How a graceful stop of QEMU ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shutdown {
    /// It quit on request with status 0: its images are closed and flushed.
    Clean,
    /// It had exited already, or exited with this status on request.
    Exited(String),
    /// It ignored `quit` for this long and was killed (zero: killed without asking).
    Killed(Duration),
}

impl Shutdown {
    /// True when the images hold every write QEMU made.
    pub fn is_clean(&self) -> bool {
        *self == Shutdown::Clean
    }
}

impl std::fmt::Display for Shutdown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Shutdown::Clean => write!(f, "QEMU quit cleanly"),
            Shutdown::Exited(status) => write!(f, "QEMU ended with {status}"),
            Shutdown::Killed(t) if t.is_zero() => write!(f, "QEMU was killed"),
            Shutdown::Killed(t) => {
                write!(
                    f,
                    "QEMU did not quit within {} s and was killed",
                    t.as_secs()
                )
            }
        }
    }
}

/// How often an adopted process (not our child, so no `wait`) is checked for exit.
const ADOPTED_EXIT_POLL: Duration = Duration::from_millis(200);

/// Whether `pid` runs: it exists and is not a zombie waiting for its parent to reap it.
fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the command name, which is in parentheses and may contain
        // spaces or parentheses itself: take what follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn kill_pid(pid: i32) {
    if pid > 0 {
        // SAFETY: kill(2) with a pid we spawned or adopted and have not seen exit (the supervisor task
        // marks the exit first); it has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

fn tail(path: &Path, max: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let start = s.len().saturating_sub(max);
    let start = (start..s.len())
        .find(|i| s.is_char_boundary(*i))
        .unwrap_or(s.len());
    s[start..].trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_alive_sees_this_process_and_not_a_missing_one() {
        assert!(pid_alive(std::process::id() as i32));
        assert!(!pid_alive(0));
        assert!(!pid_alive(-1));
        assert!(!pid_alive(i32::MAX));
    }

    #[tokio::test]
    async fn adopting_a_dead_pid_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let spec = crate::spec::InstanceSpec {
            name: "x".into(),
            memory_mib: 128,
            vcpus: 1,
            cpu_model: "qemu64".into(),
            machine: "pc".into(),
            boot: crate::spec::BootSource::Kernel {
                kernel: "/k".into(),
                initrd: "/i".into(),
                cmdline: String::new(),
            },
            firmware: crate::spec::Firmware::Bios,
            disks: vec![],
            nics: vec![],
        };
        let err = QemuProcess::adopt(&spec, dir.path(), i32::MAX, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "qemu-exited");
    }
}
