//! Copying an image's content from one host to another over the migration network.
//!
//! The destination creates an empty image of the same format and virtual size (sparse) and
//! exports it writable with `qemu-nbd` on its migration address, on the first free port of
//! the migration port range ([`Receiver`]); the source runs `qemu-img convert -n` from its
//! image into that export ([`send`]). `qemu-img` reads the source through its format driver,
//! so only guest-visible content travels: unallocated and zero ranges are skipped
//! (`--target-is-zero`: the target was just created and reads as zeros), and the target
//! stays as sparse as the source. Progress comes from `qemu-img -p`.
//!
//! Both halves stop cleanly: the export is stopped with SIGTERM so `qemu-nbd` flushes and
//! closes the image (qcow2 metadata included) before anyone reads it; a receiver that is
//! dropped or aborted before [`Receiver::finish`] kills its export and removes the partial
//! image; a sender whose future is dropped kills `qemu-img`. The source image is only ever
//! read.
//!
//! The export is protected by its name, a random token only the two agents know: `qemu-nbd`
//! refuses clients that ask for another export, so a stray connection on the migration
//! network cannot write into the image. With [`CopyTls`] on both halves (the migration's
//! temporary credentials, the same kind as its memory streams use) the copy also travels
//! over TLS: `qemu-nbd` presents the destination's certificate and lets in only a client
//! whose certificate the migration's CA signed for the source's identity (`tls-authz`), and
//! `qemu-img` checks the export's certificate against the destination's address. The
//! credential files live in a 0700 directory of 0600 files that each half removes when it
//! ends, whatever the outcome. Without credentials the data travels unencrypted.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_migrate::{StreamTls, TlsCredentials, TlsError, TlsPeer};
use ferry_qemu::DiskFormat;
use tokio::io::AsyncReadExt;
use tokio::process::Child;
use tokio::sync::watch;

use crate::tool::{self, ToolError};

/// How long a `qemu-img create` or `info` may take.
const QUICK_TOOL: Duration = Duration::from_secs(60);
/// How long `qemu-nbd` gets to flush and close the image when the export stops.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// What a copy can fail with. Codes are stable (`copy-*`, or the tool's).
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The target file exists already: a copy never overwrites a file.
    #[error("{} already exists", .0.display())]
    TargetExists(PathBuf),
    /// A file operation on the target failed.
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `qemu-img` or `qemu-nbd` failed or could not be run.
    #[error(transparent)]
    Tool(#[from] ToolError),
    /// Every port of the range is taken on the migration address.
    #[error("no free port in {first}-{last} on {addr} for the copy's export")]
    NoFreePort { addr: IpAddr, first: u16, last: u16 },
    /// `qemu-nbd` runs but did not listen in time.
    #[error("qemu-nbd did not listen on {addr} within {} s", .limit.as_secs())]
    NotListening { addr: SocketAddr, limit: Duration },
    /// `qemu-img` made no progress for too long (a dead network, a hung datastore).
    #[error("the copy made no progress for {} s (at {percent:.1}%) and was stopped", .limit.as_secs())]
    Stalled { limit: Duration, percent: f64 },
    /// `qemu-nbd` did not exit when asked; its image may lack its last metadata writes.
    #[error("the export of {} did not stop within {} s and was killed", .path.display(), STOP_GRACE.as_secs())]
    ExportStuck { path: PathBuf },
    /// `qemu-img info` said something unexpected.
    #[error("cannot read the image information of {}: {detail}", .path.display())]
    BadImage { path: PathBuf, detail: String },
    /// A request this module refuses (an export name that is not a plain token).
    #[error("invalid copy request: {0}")]
    Invalid(String),
    /// The copy's TLS credentials are unusable or could not be written.
    #[error("the copy's TLS credentials cannot be used: {0}")]
    Tls(#[from] TlsError),
}

impl CopyError {
    /// A stable, kebab-case identifier of the error kind.
    pub fn code(&self) -> &'static str {
        match self {
            CopyError::TargetExists(_) => "copy-target-exists",
            CopyError::Io { .. } => "copy-io",
            CopyError::Tool(e) => e.code(),
            CopyError::NoFreePort { .. } => "copy-port-unavailable",
            CopyError::NotListening { .. } => "copy-export-timeout",
            CopyError::Stalled { .. } => "copy-stalled",
            CopyError::ExportStuck { .. } => "copy-export-stuck",
            CopyError::BadImage { .. } => "copy-bad-image",
            CopyError::Invalid(_) => "copy-invalid-request",
            CopyError::Tls(_) => "copy-tls-credentials",
        }
    }

    /// What to do about it.
    pub fn hint(&self) -> &'static str {
        match self {
            CopyError::TargetExists(_) => {
                "a file of that name is on the destination's datastore (a source copy kept by an \
                 earlier migration? `ferry migration cleanup` removes it); remove or rename it"
            }
            CopyError::Io { .. } => "check the datastore: mounted, writable, with free space",
            CopyError::Tool(e) => e.hint(),
            CopyError::NoFreePort { .. } => {
                "wait for other migrations to end, or widen the agent's migration_ports"
            }
            CopyError::NotListening { .. } => "check the destination host's load and retry",
            CopyError::Stalled { .. } => {
                "check the migration network between the hosts and both datastores, then retry"
            }
            CopyError::ExportStuck { .. } => "check the destination's datastore and retry",
            CopyError::BadImage { .. } => "check the image with `qemu-img info`",
            CopyError::Invalid(_) => "a bug in the caller; report it",
            CopyError::Tls(_) => {
                "check the agent's state directory (writable, not full), then retry the \
                 migration: it gets new credentials"
            }
        }
    }
}

/// Sizes of an image as `qemu-img info` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageSize {
    /// What the guest sees.
    pub virtual_bytes: u64,
    /// What the file takes on its datastore now: about what a sparse copy needs.
    pub allocated_bytes: u64,
}

/// The virtual and allocated size of an image, also of one a running QEMU writes (read with
/// `--force-share`: a moment's figures, which is all a free-space check needs).
pub async fn image_size(path: &Path, format: DiskFormat) -> Result<ImageSize, CopyError> {
    let mut cmd = tool::command("qemu-img", None);
    // --force-share: the image of a running guest (block migration) is locked by its QEMU.
    cmd.args([
        "info",
        "--force-share",
        "--output=json",
        "-f",
        format.as_str(),
    ])
    .arg(path);
    let out = tool::run(cmd, QUICK_TOOL).await?;
    let bad = |detail: String| CopyError::BadImage {
        path: path.to_path_buf(),
        detail,
    };
    let info: serde_json::Value =
        serde_json::from_slice(&out).map_err(|e| bad(format!("not JSON: {e}")))?;
    let virtual_bytes = info["virtual-size"]
        .as_u64()
        .ok_or_else(|| bad("no virtual-size".into()))?;
    let allocated_bytes = info["actual-size"].as_u64().unwrap_or(virtual_bytes);
    Ok(ImageSize {
        virtual_bytes,
        allocated_bytes,
    })
}

/// An export name must be a plain token: it goes into an `nbd://` URL unescaped.
fn check_export(export: &str) -> Result<(), CopyError> {
    let plain = !export.is_empty()
        && export.len() <= 128
        && export
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain {
        Ok(())
    } else {
        Err(CopyError::Invalid(format!(
            "export name {export:?} is not a token of letters, digits, - and _"
        )))
    }
}

/// The id of the credentials object given to `qemu-nbd` or `qemu-img`.
const TLS_CREDS_ID: &str = "ferry-copy-tls";
/// The id of the authz object naming the one client `qemu-nbd` accepts.
const TLS_AUTHZ_ID: &str = "ferry-copy-authz";

/// One half's TLS: the migration's temporary credentials and the directory their files are
/// written to while the half runs. The directory is created 0700 (replacing what a crashed
/// earlier half left there) and removed when the half ends, so it should be private to the
/// agent (its state directory) and never on a datastore.
#[derive(Debug, Clone)]
pub struct CopyTls {
    /// The receiver's must name the source's identity ([`TlsPeer::Client`]), the sender's the
    /// destination's address ([`TlsPeer::Server`]).
    pub credentials: TlsCredentials,
    pub dir: PathBuf,
}

impl CopyTls {
    /// Writes the files, refusing credentials made for the other half.
    fn write(&self, server: bool) -> Result<StreamTls, CopyError> {
        if self.credentials.is_server() != server {
            let (half, wanted) = if server {
                ("receiver", "the source's identity")
            } else {
                ("sender", "the destination's host name")
            };
            return Err(TlsError::Invalid(format!(
                "the {half}'s credentials must name {wanted} as their peer"
            ))
            .into());
        }
        Ok(StreamTls::create(&self.dir, self.credentials.clone())?)
    }
}

/// `--object tls-creds-x509,...` for credentials written by [`CopyTls::write`].
fn tls_creds_object(tls: &StreamTls) -> String {
    let endpoint = if tls.credentials().is_server() {
        "server"
    } else {
        "client"
    };
    // verify-peer: a server asks for (and checks) the client's certificate; a client checks
    // the server's either way.
    format!(
        "tls-creds-x509,id={TLS_CREDS_ID},endpoint={endpoint},verify-peer=on,dir={}",
        opt_value(&tls.dir().to_string_lossy())
    )
}

/// A value inside a QEMU option string: a comma is written twice.
fn opt_value(v: &str) -> String {
    v.replace(',', ",,")
}

/// The destination's half, as asked.
#[derive(Debug, Clone)]
pub struct ReceiveSpec {
    /// The image to create; it must not exist.
    pub path: PathBuf,
    pub format: DiskFormat,
    /// Virtual size of the new image (the source's).
    pub size_bytes: u64,
    /// The migration address to listen on.
    pub addr: IpAddr,
    /// Ports tried in order, first to last.
    pub first_port: u16,
    pub last_port: u16,
    /// The export name the sender must ask for (a secret token).
    pub export: String,
    /// Run `qemu-nbd` in this network namespace (lab hosts).
    pub netns: Option<String>,
    /// How long `qemu-nbd` may take to listen.
    pub start_timeout: Duration,
    /// Serve the export over TLS to the source named in these credentials only.
    pub tls: Option<CopyTls>,
}

/// A new image exported writable over NBD, waiting for the sender. Dropped or aborted before
/// [`Receiver::finish`], it removes the image.
#[derive(Debug)]
pub struct Receiver {
    child: Child,
    path: PathBuf,
    addr: SocketAddr,
    export: String,
    /// The image is complete and belongs to the caller.
    kept: bool,
    /// The credential files while the export runs; removed with the receiver (dropped after
    /// [`Drop::drop`] has killed `qemu-nbd`).
    tls: Option<StreamTls>,
}

impl Receiver {
    /// Creates the target image and starts its export on the first free port.
    pub async fn start(spec: &ReceiveSpec) -> Result<Receiver, CopyError> {
        check_export(&spec.export)?;
        if spec.first_port > spec.last_port || spec.first_port == 0 {
            return Err(CopyError::Invalid(format!(
                "port range {}-{}",
                spec.first_port, spec.last_port
            )));
        }
        if spec.path.symlink_metadata().is_ok() {
            return Err(CopyError::TargetExists(spec.path.clone()));
        }
        if let Some(parent) = spec.path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|source| CopyError::Io {
                    path: parent.to_path_buf(),
                    source,
                })?;
        }
        let mut create = tool::command("qemu-img", None);
        create
            .args(["create", "-q", "-f", spec.format.as_str()])
            .arg(&spec.path)
            .arg(spec.size_bytes.to_string());
        // Written before the image exists: unusable credentials leave nothing behind. Dropped
        // on every failure below, which removes the files.
        let tls = spec.tls.as_ref().map(|t| t.write(true)).transpose()?;
        // From here on the file is ours: removed on every failure below.
        let guard = RemoveOnDrop(Some(spec.path.clone()));
        if let Err(e) = tool::run(create, QUICK_TOOL).await {
            // `qemu-img create` may have created the file before failing.
            return Err(e.into());
        }
        for port in spec.first_port..=spec.last_port {
            let addr = SocketAddr::new(spec.addr, port);
            match export(spec, addr, tls.as_ref()).await? {
                Some(child) => {
                    let mut guard = guard;
                    guard.0 = None;
                    return Ok(Receiver {
                        child,
                        path: spec.path.clone(),
                        addr,
                        export: spec.export.clone(),
                        kept: false,
                        tls,
                    });
                }
                None => continue,
            }
        }
        Err(CopyError::NoFreePort {
            addr: spec.addr,
            first: spec.first_port,
            last: spec.last_port,
        })
    }

    /// Where the sender connects.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn export(&self) -> &str {
        &self.export
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `qemu-nbd` process, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Whether the export is served over TLS.
    pub fn tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Stops the export cleanly (flushed and closed) and keeps the image.
    pub async fn finish(mut self) -> Result<PathBuf, CopyError> {
        if !tool::stop(&mut self.child, STOP_GRACE).await {
            return Err(CopyError::ExportStuck {
                path: self.path.clone(),
            });
        }
        self.kept = true;
        Ok(self.path.clone())
    }

    /// Stops the export and removes the image.
    pub async fn abort(mut self) {
        tool::stop(&mut self.child, Duration::from_secs(5)).await;
        // Drop removes the file.
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if !self.kept {
            // The child is killed by kill_on_drop; unlinking while it still has the file open
            // is fine on Linux.
            let _ = self.child.start_kill();
            if let Err(e) = std::fs::remove_file(&self.path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot remove a partial copy");
                }
            }
        }
    }
}

/// Removes a file when dropped, unless disarmed (`.0 = None`).
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Starts `qemu-nbd` on `addr`: the running child once it listens, `None` when the port is
/// taken (the caller tries the next one).
async fn export(
    spec: &ReceiveSpec,
    addr: SocketAddr,
    tls: Option<&StreamTls>,
) -> Result<Option<Child>, CopyError> {
    let mut cmd = tool::command("qemu-nbd", spec.netns.as_deref());
    if let Some(tls) = tls {
        cmd.arg("--object").arg(tls_creds_object(tls));
        if let TlsPeer::Client { identity } = &tls.credentials().peer {
            cmd.arg("--object").arg(format!(
                "authz-simple,id={TLS_AUTHZ_ID},identity={}",
                opt_value(identity)
            ));
            cmd.arg(format!("--tls-authz={TLS_AUTHZ_ID}"));
        }
        cmd.arg(format!("--tls-creds={TLS_CREDS_ID}"));
    }
    cmd.arg(format!("--bind={}", addr.ip()))
        .arg(format!("--port={}", addr.port()))
        .arg(format!("--format={}", spec.format.as_str()))
        .arg(format!("--export-name={}", spec.export))
        .arg("--shared=1")
        .arg("--persistent")
        .arg(&spec.path);
    let name = tool::tool_name(&cmd);
    let mut child = cmd.spawn().map_err(|source| ToolError::Spawn {
        tool: name.clone(),
        source,
    })?;
    let Some(pid) = child.id() else {
        return Err(CopyError::NotListening {
            addr,
            limit: spec.start_timeout,
        });
    };
    let deadline = Instant::now() + spec.start_timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let stderr = tool::read_stderr(&mut child).await;
            if stderr.contains("Address already in use") {
                return Ok(None);
            }
            return Err(ToolError::Failed {
                tool: name,
                status: status.to_string(),
                stderr,
            }
            .into());
        }
        if listening(pid, addr) {
            return Ok(Some(child));
        }
        if Instant::now() > deadline {
            // Dropping the child kills it.
            return Err(CopyError::NotListening {
                addr,
                limit: spec.start_timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether process `pid` itself listens on `addr`: a LISTEN line for `addr` in
/// `/proc/PID/net/tcp{,6}` (the table of the process's network namespace) whose socket is one
/// of the process's own file descriptors. No connection is made, so nothing counts as the
/// export's one client, and another program listening on the same port (with SO_REUSEPORT)
/// is not mistaken for the export.
fn listening(pid: u32, addr: SocketAddr) -> bool {
    let table = match addr {
        SocketAddr::V4(_) => "tcp",
        SocketAddr::V6(_) => "tcp6",
    };
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
        return false;
    };
    let inodes: Vec<u64> = text
        .lines()
        .skip(1)
        .filter_map(parse_listen_line)
        .filter(|(a, _)| *a == addr)
        .map(|(_, inode)| inode)
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| {
            let t = target.to_string_lossy();
            t.strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|n| inodes.contains(&n))
        })
    })
}

/// The local address and socket inode of a `/proc/net/tcp{,6}` line in state LISTEN.
fn parse_listen_line(line: &str) -> Option<(SocketAddr, u64)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (local, state, inode) = (fields.get(1)?, fields.get(3)?, fields.get(9)?);
    if *state != "0A" {
        return None;
    }
    let (ip_hex, port_hex) = local.split_once(':')?;
    let port = u16::from_str_radix(port_hex, 16).ok()?;
    let ip = match ip_hex.len() {
        8 => {
            let v = u32::from_str_radix(ip_hex, 16).ok()?;
            IpAddr::from(v.swap_bytes().to_be_bytes())
        }
        32 => {
            let mut bytes = [0u8; 16];
            for (i, word) in bytes.chunks_mut(4).enumerate() {
                let v = u32::from_str_radix(ip_hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
                word.copy_from_slice(&v.swap_bytes().to_be_bytes());
            }
            IpAddr::from(bytes)
        }
        _ => return None,
    };
    Some((SocketAddr::new(ip, port), inode.parse().ok()?))
}

/// The source's half, as asked.
#[derive(Debug, Clone)]
pub struct SendSpec {
    /// The image to read (never written).
    pub path: PathBuf,
    pub format: DiskFormat,
    /// The receiver's export.
    pub destination: SocketAddr,
    pub export: String,
    /// Run `qemu-img` in this network namespace (lab hosts).
    pub netns: Option<String>,
    /// `qemu-img -r`: bytes per second.
    pub rate_limit_bps: Option<u64>,
    /// No progress for this long stops the copy.
    pub stall_timeout: Duration,
    /// Send over TLS, to an export whose certificate is valid for the host name in these
    /// credentials only.
    pub tls: Option<CopyTls>,
}

/// How far a send is. `done_bytes` counts the virtual size processed (zero ranges included),
/// which is what `qemu-img`'s percentage measures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SendProgress {
    pub total_bytes: u64,
    pub done_bytes: u64,
    pub percent: f64,
    pub elapsed_ms: u64,
    /// Over the last few seconds.
    pub rate_bps: f64,
}

/// A finished send.
#[derive(Debug, Clone, PartialEq)]
pub struct SendOutcome {
    pub total_bytes: u64,
    pub elapsed: Duration,
}

/// The progress rate is averaged over this long.
const RATE_WINDOW: Duration = Duration::from_secs(3);

/// Copies `spec.path`'s content into the receiver's export, reporting on `progress`. Dropping
/// the future kills `qemu-img`.
pub async fn send(
    spec: &SendSpec,
    progress: &watch::Sender<SendProgress>,
) -> Result<SendOutcome, CopyError> {
    check_export(&spec.export)?;
    // Dropped when this future ends or is dropped (after `qemu-img`, killed on drop, has
    // read them at its start), which removes the files.
    let tls = spec.tls.as_ref().map(|t| t.write(false)).transpose()?;
    let started = Instant::now();
    let size = image_size(&spec.path, spec.format).await?;
    let total = size.virtual_bytes;
    progress.send_replace(SendProgress {
        total_bytes: total,
        ..SendProgress::default()
    });
    let mut cmd = tool::command("qemu-img", spec.netns.as_deref());
    cmd.args(["convert", "-n", "-p", "--target-is-zero", "-W"])
        .args(["-f", spec.format.as_str()]);
    if let Some(r) = spec.rate_limit_bps.filter(|r| *r > 0) {
        cmd.arg("-r").arg(r.to_string());
    }
    match &tls {
        Some(tls) => {
            let hostname = match &tls.credentials().peer {
                TlsPeer::Server { hostname } => hostname,
                // CopyTls::write(false) refused these already.
                TlsPeer::Client { .. } => {
                    return Err(CopyError::Invalid(
                        "the sender's credentials name no destination host".into(),
                    ))
                }
            };
            // An `nbd://` URL cannot carry TLS options: the target is given as image
            // options, whose driver (nbd) makes it raw, as `-O raw` does for the URL.
            cmd.arg("--object")
                .arg(tls_creds_object(tls))
                .arg(&spec.path)
                .arg("--target-image-opts")
                .arg(format!(
                    "driver=nbd,host={},port={},export={},tls-creds={TLS_CREDS_ID},tls-hostname={}",
                    opt_value(&spec.destination.ip().to_string()),
                    spec.destination.port(),
                    spec.export,
                    opt_value(hostname)
                ));
        }
        None => {
            cmd.args(["-O", "raw"])
                .arg(&spec.path)
                .arg(format!("nbd://{}/{}", spec.destination, spec.export));
        }
    }
    cmd.stdout(std::process::Stdio::piped());
    let name = tool::tool_name(&cmd);
    let mut child = cmd.spawn().map_err(|source| ToolError::Spawn {
        tool: name.clone(),
        source,
    })?;
    let Some(mut stdout) = child.stdout.take() else {
        return Err(CopyError::Invalid("qemu-img has no stdout".into()));
    };
    let mut stderr = child.stderr.take();
    let stderr_task = tokio::spawn(async move {
        let mut buf = Vec::new();
        if let Some(e) = stderr.as_mut() {
            let _ = e.read_to_end(&mut buf).await;
        }
        buf
    });
    let mut meter = Meter::new(total, started);
    let mut pending = String::new();
    let mut chunk = [0u8; 512];
    let mut last_change = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut stdout_open = true;
    let status = loop {
        tokio::select! {
            n = stdout.read(&mut chunk), if stdout_open => match n {
                Ok(0) | Err(_) => stdout_open = false,
                Ok(n) => {
                    pending.push_str(&String::from_utf8_lossy(&chunk[..n]));
                    let mut changed = false;
                    for percent in take_percents(&mut pending) {
                        changed |= meter.update(percent);
                    }
                    if changed {
                        last_change = Instant::now();
                        progress.send_replace(meter.sample());
                    }
                }
            },
            status = child.wait() => break status,
            _ = tick.tick() => {
                if last_change.elapsed() > spec.stall_timeout {
                    let _ = child.kill().await;
                    stderr_task.abort();
                    return Err(CopyError::Stalled {
                        limit: spec.stall_timeout,
                        percent: meter.percent,
                    });
                }
                progress.send_replace(meter.sample());
            }
        }
    };
    let status = status.map_err(|source| ToolError::Spawn {
        tool: name.clone(),
        source,
    })?;
    let err = tokio::time::timeout(Duration::from_secs(2), stderr_task)
        .await
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or_default();
    if !status.success() {
        return Err(ToolError::Failed {
            tool: name,
            status: status.to_string(),
            stderr: tool::tail(&err),
        }
        .into());
    }
    meter.update(100.0);
    let elapsed = started.elapsed();
    let mut last = meter.sample();
    last.rate_bps = if elapsed.as_secs_f64() > 0.0 {
        total as f64 / elapsed.as_secs_f64()
    } else {
        0.0
    };
    progress.send_replace(last);
    Ok(SendOutcome {
        total_bytes: total,
        elapsed,
    })
}

/// Turns `qemu-img -p` percentages into bytes and a rate.
struct Meter {
    total: u64,
    started: Instant,
    percent: f64,
    window: std::collections::VecDeque<(Instant, u64)>,
}

impl Meter {
    fn new(total: u64, started: Instant) -> Meter {
        Meter {
            total,
            started,
            percent: 0.0,
            window: std::collections::VecDeque::new(),
        }
    }

    fn done(&self) -> u64 {
        ((self.percent / 100.0) * self.total as f64).round() as u64
    }

    /// True when the percentage moved.
    fn update(&mut self, percent: f64) -> bool {
        let percent = percent.clamp(0.0, 100.0);
        if percent <= self.percent {
            return false;
        }
        self.percent = percent;
        let now = Instant::now();
        self.window.push_back((now, self.done()));
        while self
            .window
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
            && self.window.len() > 2
        {
            self.window.pop_front();
        }
        true
    }

    fn sample(&self) -> SendProgress {
        let done = self.done();
        let rate = match (self.window.front(), self.window.back()) {
            (Some((t0, b0)), Some((t1, b1))) if t1 > t0 => {
                (b1 - b0) as f64 / t1.duration_since(*t0).as_secs_f64()
            }
            _ => {
                let secs = self.started.elapsed().as_secs_f64();
                if secs > 0.0 {
                    done as f64 / secs
                } else {
                    0.0
                }
            }
        };
        SendProgress {
            total_bytes: self.total,
            done_bytes: done,
            percent: self.percent,
            elapsed_ms: self.started.elapsed().as_millis() as u64,
            rate_bps: rate,
        }
    }
}

/// The complete `(P/100%)` fields in `pending` (separated by `\r` or `\n`), leaving an
/// incomplete tail for the next read.
fn take_percents(pending: &mut String) -> Vec<f64> {
    let mut out = Vec::new();
    while let Some(end) = pending.find(['\r', '\n']) {
        let field: String = pending.drain(..=end).collect();
        if let Some(p) = parse_percent(&field) {
            out.push(p);
        }
    }
    out
}

fn parse_percent(field: &str) -> Option<f64> {
    let inner = field.trim().strip_prefix('(')?.strip_suffix("/100%)")?;
    inner.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum::{image_checksum, ChecksumOptions};
    use crate::testutil::{processes_with_arg, qemu_img, qemu_io};

    #[test]
    fn progress_lines_parse() {
        let mut s = String::from("    (0.00/100%)\r    (12.50/100%)\r    (25.");
        assert_eq!(take_percents(&mut s), vec![0.0, 12.5]);
        assert_eq!(s, "    (25.");
        s.push_str("00/100%)\r\n");
        assert_eq!(take_percents(&mut s), vec![25.0]);
        assert!(s.is_empty());
        assert_eq!(parse_percent("junk"), None);
    }

    #[test]
    fn proc_net_tcp_lines_parse() {
        let v4 = "   0: 0100007F:C094 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 933457 1";
        assert_eq!(
            parse_listen_line(v4),
            Some(("127.0.0.1:49300".parse().unwrap(), 933457))
        );
        let established = v4.replace(" 0A ", " 01 ");
        assert_eq!(parse_listen_line(&established), None);
        let v6 = "   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1";
        assert_eq!(
            parse_listen_line(v6),
            Some(("[::1]:8080".parse().unwrap(), 1))
        );
    }

    #[test]
    fn export_names_are_plain_tokens() {
        assert!(check_export("abc-DEF_09").is_ok());
        for bad in ["", "a/b", "a b", "a?x", &"x".repeat(200)] {
            assert_eq!(
                check_export(bad).unwrap_err().code(),
                "copy-invalid-request"
            );
        }
    }

    fn receive_spec(path: PathBuf, format: DiskFormat, size: u64, first: u16) -> ReceiveSpec {
        ReceiveSpec {
            path,
            format,
            size_bytes: size,
            addr: "127.0.0.1".parse().unwrap(),
            first_port: first,
            last_port: first + 15,
            export: "test-export-0123".into(),
            netns: None,
            start_timeout: Duration::from_secs(10),
            tls: None,
        }
    }

    fn send_spec(path: PathBuf, format: DiskFormat, r: &Receiver) -> SendSpec {
        SendSpec {
            path,
            format,
            destination: r.addr(),
            export: r.export().into(),
            netns: None,
            rate_limit_bps: None,
            stall_timeout: Duration::from_secs(60),
            tls: None,
        }
    }

    /// Copies `src` into a new `dst` between two local "hosts"; the receiver's port.
    async fn copy(src: &Path, dst: &Path, format: DiskFormat, first_port: u16) -> SendOutcome {
        let size = image_size(src, format).await.unwrap().virtual_bytes;
        let r = Receiver::start(&receive_spec(dst.into(), format, size, first_port))
            .await
            .unwrap();
        let (tx, rx) = watch::channel(SendProgress::default());
        let out = send(&send_spec(src.into(), format, &r), &tx).await.unwrap();
        assert_eq!(rx.borrow().percent, 100.0);
        assert_eq!(rx.borrow().done_bytes, size);
        r.finish().await.unwrap();
        out
    }

    #[tokio::test]
    async fn a_copy_reproduces_the_content_and_a_sparse_image_stays_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", src.to_str().unwrap(), "1G"]);
        qemu_io(&src, "qcow2", "write -P 0x5a 0 512K");
        qemu_io(&src, "qcow2", "write -P 0xa5 700M 512K");
        let dst = dir.path().join("dst.qcow2");
        let out = copy(&src, &dst, DiskFormat::Qcow2, 49700).await;
        assert!(
            out.elapsed < Duration::from_secs(10),
            "1 GiB sparse took {:?}",
            out.elapsed
        );
        let opts = ChecksumOptions::default();
        let a = image_checksum(&src, DiskFormat::Qcow2, &opts, None)
            .await
            .unwrap();
        let b = image_checksum(&dst, DiskFormat::Qcow2, &opts, None)
            .await
            .unwrap();
        assert_eq!(a.sha256, b.sha256);
        let allocated = image_size(&dst, DiskFormat::Qcow2)
            .await
            .unwrap()
            .allocated_bytes;
        assert!(allocated < 8 << 20, "target not sparse: {allocated} bytes");
        // Raw to raw too, content checked against the source's bytes.
        let rsrc = dir.path().join("src.raw");
        qemu_img(&["create", "-q", "-f", "raw", rsrc.to_str().unwrap(), "32M"]);
        qemu_io(&rsrc, "raw", "write -P 0x11 3M 5M");
        let rdst = dir.path().join("dst.raw");
        copy(&rsrc, &rdst, DiskFormat::Raw, 49720).await;
        assert_eq!(std::fs::read(&rsrc).unwrap(), std::fs::read(&rdst).unwrap());
        assert!(processes_with_arg(&dst).is_empty() && processes_with_arg(&rdst).is_empty());
    }

    /// A qcow2 overlay moves as a file (raw on both ends), so its backing reference stays;
    /// read as qcow2 with the shared base, both copies show the guest the same content.
    #[tokio::test]
    async fn an_overlay_is_copied_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "64M"]);
        qemu_io(&base, "qcow2", "write -P 0x11 0 8M");
        let overlay = dir.path().join("vm.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            "base.qcow2",
            overlay.to_str().unwrap(),
        ]);
        qemu_io(&overlay, "qcow2", "write -P 0x22 4M 1M");
        let copy_path = dir.path().join("sub").join("vm.qcow2");
        // The overlay names its base relatively: the copy must find it next to itself, as a
        // base on a shared datastore is found at the same place on every host.
        std::fs::create_dir_all(dir.path().join("sub")).unwrap();
        std::fs::copy(&base, dir.path().join("sub").join("base.qcow2")).unwrap();
        let file_len = image_size(&overlay, DiskFormat::Raw)
            .await
            .unwrap()
            .virtual_bytes;
        assert_eq!(file_len, std::fs::metadata(&overlay).unwrap().len());
        copy(&overlay, &copy_path, DiskFormat::Raw, 49860).await;
        assert_eq!(
            std::fs::read(&overlay).unwrap(),
            std::fs::read(&copy_path).unwrap()
        );
        let opts = ChecksumOptions::default();
        let a = image_checksum(&overlay, DiskFormat::Qcow2, &opts, None)
            .await
            .unwrap();
        let b = image_checksum(&copy_path, DiskFormat::Qcow2, &opts, None)
            .await
            .unwrap();
        assert_eq!(a.sha256, b.sha256);
        assert_eq!(a.size_bytes, 64 << 20);
    }

    /// `n` consecutive ports of 127.0.0.1, bound (so taken) until the listeners are dropped.
    /// Searched for, because any fixed port may be some connection's ephemeral port.
    fn taken_ports(n: u16) -> (u16, Vec<std::net::TcpListener>) {
        for first in (50000..60000).step_by(usize::from(n) + 1) {
            let held: Vec<_> = (first..first + n)
                .map_while(|p| std::net::TcpListener::bind(("127.0.0.1", p)).ok())
                .collect();
            if held.len() == usize::from(n) {
                return (first, held);
            }
        }
        panic!("no {n} free consecutive ports");
    }

    #[tokio::test]
    async fn a_taken_port_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let (taken, holder) = taken_ports(1);
        let spec = receive_spec(dir.path().join("t.raw"), DiskFormat::Raw, 1 << 20, taken);
        let r = Receiver::start(&spec).await.unwrap();
        assert!(r.addr().port() > taken, "{}", r.addr());
        drop(holder);
        r.abort().await;
        assert!(!spec.path.exists());
    }

    #[tokio::test]
    async fn failures_clean_up_and_never_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        // An existing target is refused and left alone.
        let existing = dir.path().join("there.raw");
        std::fs::write(&existing, b"keep me").unwrap();
        let err = Receiver::start(&receive_spec(
            existing.clone(),
            DiskFormat::Raw,
            1 << 20,
            49760,
        ))
        .await
        .unwrap_err();
        assert_eq!(err.code(), "copy-target-exists");
        assert_eq!(std::fs::read(&existing).unwrap(), b"keep me");
        // All ports taken: nothing created.
        let (first, holders) = taken_ports(2);
        let mut spec = receive_spec(dir.path().join("none.raw"), DiskFormat::Raw, 1 << 20, first);
        spec.last_port = first + 1;
        let err = Receiver::start(&spec).await.unwrap_err();
        assert_eq!(err.code(), "copy-port-unavailable");
        assert!(!spec.path.exists());
        drop(holders);
        // A receiver dropped mid-way removes its partial image and its export.
        let src = dir.path().join("s.raw");
        qemu_img(&["create", "-q", "-f", "raw", src.to_str().unwrap(), "64M"]);
        qemu_io(&src, "raw", "write -P 0x42 0 64M");
        let target = dir.path().join("partial.raw");
        let r = Receiver::start(&receive_spec(
            target.clone(),
            DiskFormat::Raw,
            64 << 20,
            49800,
        ))
        .await
        .unwrap();
        let mut s = send_spec(src.clone(), DiskFormat::Raw, &r);
        s.rate_limit_bps = Some(8 << 20);
        let (tx, mut rx) = watch::channel(SendProgress::default());
        let sending = tokio::spawn(async move { send(&s, &tx).await });
        rx.wait_for(|p| p.done_bytes > 0).await.unwrap();
        sending.abort();
        let _ = sending.await;
        drop(r);
        assert!(!target.exists(), "partial image left");
        for _ in 0..100 {
            if processes_with_arg(&target).is_empty() && processes_with_arg(&src).is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(processes_with_arg(&target).is_empty(), "qemu-nbd left");
        assert!(processes_with_arg(&src).is_empty(), "qemu-img left");
        // A sender to nowhere fails with the tool's words; the source is untouched.
        let before = std::fs::read(&src).unwrap();
        let (tx, _rx) = watch::channel(SendProgress::default());
        let nowhere = SendSpec {
            path: src.clone(),
            format: DiskFormat::Raw,
            destination: "127.0.0.1:9".parse().unwrap(),
            export: "nothing".into(),
            netns: None,
            rate_limit_bps: None,
            stall_timeout: Duration::from_secs(30),
            tls: None,
        };
        let err = send(&nowhere, &tx).await.unwrap_err();
        assert_eq!(err.code(), "storage-tool-failed", "{err}");
        assert_eq!(std::fs::read(&src).unwrap(), before);
    }

    /// The figures of the copy: `cargo test -p ferry-storage --release -- --ignored
    /// --nocapture copy_rates`.
    #[tokio::test]
    #[ignore = "a measurement, not a check"]
    async fn copy_rates() {
        let dir = tempfile::tempdir().unwrap();
        let sparse = dir.path().join("sparse.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            sparse.to_str().unwrap(),
            "1G",
        ]);
        qemu_io(&sparse, "qcow2", "write -P 0x5a 0 1M");
        let full = dir.path().join("full.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            full.to_str().unwrap(),
            "256M",
        ]);
        qemu_io(&full, "qcow2", "write -P 0x5a 0 256M");
        let opts = ChecksumOptions::default();
        for (i, (src, what)) in [
            (&sparse, "1 GiB sparse, 1 MiB data"),
            (&full, "256 MiB full"),
        ]
        .into_iter()
        .enumerate()
        {
            let dst = dir.path().join(format!("copy{i}.qcow2"));
            let out = copy(src, &dst, DiskFormat::Qcow2, 49820 + 20 * i as u16).await;
            let t = Instant::now();
            let sum = image_checksum(&dst, DiskFormat::Qcow2, &opts, None)
                .await
                .unwrap();
            let mib = out.total_bytes as f64 / f64::from(1 << 20);
            println!(
                "{what}: copied in {:.3} s ({:.0} MiB/s of virtual size), checksum in {:.3} s ({} MiB read, {} MiB zero), target allocates {} KiB",
                out.elapsed.as_secs_f64(),
                mib / out.elapsed.as_secs_f64(),
                t.elapsed().as_secs_f64(),
                sum.read_bytes >> 20,
                sum.zero_bytes >> 20,
                image_size(&dst, DiskFormat::Qcow2).await.unwrap().allocated_bytes >> 10
            );
        }
    }
}
