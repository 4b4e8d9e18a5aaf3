//! The SHA-256 of what a guest reads from an image: the proof that a copy holds the same
//! content as its source.
//!
//! The image is exported read-only by `qemu-nbd` on a private unix socket and read whole
//! through [`crate::nbd`], so the digest depends only on the guest-visible bytes: a qcow2
//! and a raw image with the same content have the same digest, however they are allocated.
//! Ranges the server reports as reading zeros (`base:allocation`) are hashed as zeros without
//! being transferred, which keeps sparse images cheap to check. `qemu-nbd` takes a shared
//! read lock, so an image a QEMU has open for writing is refused rather than hashed while it
//! changes. The child process is killed and the socket directory removed on every path out,
//! errors included.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_qemu::DiskFormat;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::nbd::{ConnectOptions, NbdClient, NbdError};
use crate::tool::{self, ToolError};

/// The export name on the private socket.
const EXPORT: &str = "ferry-checksum";

/// How the checksum runs.
#[derive(Debug, Clone)]
pub struct ChecksumOptions {
    /// Where the private socket directory is made; default the system's temporary directory.
    /// Unix socket paths are limited to 107 bytes, so keep it short.
    pub socket_dir: Option<PathBuf>,
    /// Limit of each NBD exchange.
    pub io_timeout: Duration,
    /// How long `qemu-nbd` may take to open the image and listen.
    pub start_timeout: Duration,
    /// The `qemu-nbd` binary.
    pub qemu_nbd: PathBuf,
}

impl Default for ChecksumOptions {
    fn default() -> Self {
        ChecksumOptions {
            socket_dir: None,
            io_timeout: Duration::from_secs(60),
            start_timeout: Duration::from_secs(20),
            qemu_nbd: PathBuf::from("qemu-nbd"),
        }
    }
}

/// An image's content digest and how it was obtained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageChecksum {
    /// Lower-case hex SHA-256 of the guest-visible bytes, offset 0 to the virtual size.
    pub sha256: String,
    /// The virtual size (what the guest sees).
    pub size_bytes: u64,
    /// Bytes read from the export.
    pub read_bytes: u64,
    /// Bytes hashed as zeros because the server said they read as zeros.
    pub zero_bytes: u64,
    pub elapsed: Duration,
}

/// What a checksum can fail with. Codes are stable.
#[derive(Debug, thiserror::Error)]
pub enum ChecksumError {
    /// No such image file.
    #[error("image {} does not exist", .0.display())]
    NotFound(PathBuf),
    /// The private socket directory could not be made.
    #[error("cannot create a socket directory in {}: {source}", .dir.display())]
    SocketDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `qemu-nbd` could not be started, or exited before serving (lock held, bad image).
    #[error(transparent)]
    Tool(#[from] ToolError),
    /// `qemu-nbd` did not listen within its start time.
    #[error("qemu-nbd did not serve {} within {} s", .path.display(), .limit.as_secs())]
    NotServing { path: PathBuf, limit: Duration },
    /// Reading the export failed.
    #[error("reading {}: {source}", .path.display())]
    Nbd {
        path: PathBuf,
        #[source]
        source: NbdError,
    },
}

impl ChecksumError {
    /// A stable, kebab-case identifier of the error kind.
    pub fn code(&self) -> &'static str {
        match self {
            ChecksumError::NotFound(_) => "image-not-found",
            ChecksumError::SocketDir { .. } => "checksum-socket-dir",
            ChecksumError::Tool(e) => e.code(),
            ChecksumError::NotServing { .. } => "checksum-export-timeout",
            ChecksumError::Nbd { source, .. } => source.code(),
        }
    }

    /// What to do about it.
    pub fn hint(&self) -> &'static str {
        match self {
            ChecksumError::NotFound(_) => "check the datastore and the file name",
            ChecksumError::SocketDir { .. } => {
                "check that the temporary directory exists and is writable"
            }
            ChecksumError::Tool(e) => e.hint(),
            ChecksumError::NotServing { .. } => {
                "the datastore may be slow or hung; check it and retry"
            }
            ChecksumError::Nbd { source, .. } => source.hint(),
        }
    }
}

/// The SHA-256 of `path`'s guest-visible content, read as `format`. `progress`, when given,
/// receives the bytes hashed so far.
pub async fn image_checksum(
    path: &Path,
    format: DiskFormat,
    opts: &ChecksumOptions,
    progress: Option<&watch::Sender<u64>>,
) -> Result<ImageChecksum, ChecksumError> {
    let started = Instant::now();
    if !path.exists() {
        return Err(ChecksumError::NotFound(path.to_path_buf()));
    }
    let parent = opts.socket_dir.clone().unwrap_or_else(std::env::temp_dir);
    // Mode 0700 (tempfile's default): no other user can connect to the export. Removed when
    // dropped, on every path out of this function.
    let dir = tempfile::Builder::new()
        .prefix("ferry-sum-")
        .tempdir_in(&parent)
        .map_err(|source| ChecksumError::SocketDir {
            dir: parent.clone(),
            source,
        })?;
    let socket = dir.path().join("nbd.sock");
    let mut cmd = tool::command(&opts.qemu_nbd, None);
    cmd.arg("--read-only")
        .arg("--shared=1")
        .arg(format!("--format={}", format.as_str()))
        .arg(format!("--export-name={EXPORT}"))
        .arg("--socket")
        .arg(&socket)
        .arg(path);
    let tool_name = tool::tool_name(&cmd);
    // Dropped (and so killed) on every early return below.
    let mut child = cmd.spawn().map_err(|source| ToolError::Spawn {
        tool: tool_name.clone(),
        source,
    })?;
    let connect = ConnectOptions {
        export: EXPORT.into(),
        timeout: opts.io_timeout,
        block_status: true,
    };
    let deadline = Instant::now() + opts.start_timeout;
    let mut client = loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(ToolError::Failed {
                tool: tool_name,
                status: status.to_string(),
                stderr: tool::read_stderr(&mut child).await,
            }
            .into());
        }
        if socket.exists() {
            match NbdClient::connect_unix(&socket, &connect).await {
                Ok(c) => break c,
                Err(NbdError::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                    ) => {}
                Err(source) => {
                    // qemu-nbd may listen before it opens the image and then exit on a bad
                    // one, resetting the connection: its own error says why, when it has one.
                    let exited = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
                    if let Ok(Ok(status)) = exited {
                        if !status.success() {
                            return Err(ToolError::Failed {
                                tool: tool_name,
                                status: status.to_string(),
                                stderr: tool::read_stderr(&mut child).await,
                            }
                            .into());
                        }
                    }
                    return Err(ChecksumError::Nbd {
                        path: path.to_path_buf(),
                        source,
                    });
                }
            }
        }
        if Instant::now() > deadline {
            return Err(ChecksumError::NotServing {
                path: path.to_path_buf(),
                limit: opts.start_timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let size_bytes = client.size();
    let hashed = hash_export(&mut client, progress).await;
    let _ = client.disconnect().await;
    tool::stop(&mut child, Duration::from_secs(5)).await;
    drop(dir);
    let (sha256, read_bytes, zero_bytes) = hashed.map_err(|source| ChecksumError::Nbd {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(ImageChecksum {
        sha256,
        size_bytes,
        read_bytes,
        zero_bytes,
        elapsed: started.elapsed(),
    })
}

/// Reads the whole export in order into SHA-256: `(hex digest, bytes read, bytes known zero)`.
pub async fn hash_export<S>(
    client: &mut NbdClient<S>,
    progress: Option<&watch::Sender<u64>>,
) -> Result<(String, u64, u64), NbdError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let size = client.size();
    let chunk = client.max_read().max(4096);
    let mut buf = vec![0u8; chunk as usize];
    let zeros = vec![0u8; chunk as usize];
    let mut hasher = Sha256::new();
    let (mut offset, mut read, mut zero) = (0u64, 0u64, 0u64);
    while offset < size {
        let want = (size - offset).min(u64::from(chunk)) as u32;
        let extents = if client.has_block_status() {
            client.block_status(offset, want).await?
        } else {
            vec![crate::nbd::Extent {
                length: u64::from(want),
                hole: false,
                zero: false,
            }]
        };
        for e in extents {
            let n = e.length as usize;
            if e.zero {
                hasher.update(&zeros[..n]);
                zero += e.length;
            } else {
                client.read(offset, &mut buf[..n]).await?;
                hasher.update(&buf[..n]);
                read += e.length;
            }
            offset += e.length;
        }
        if let Some(p) = progress {
            p.send_replace(offset);
        }
    }
    Ok((hex::encode(hasher.finalize()), read, zero))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{qemu_img, qemu_io};

    #[tokio::test]
    async fn the_digest_is_of_content_not_format_and_sees_one_byte() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("a.qcow2");
        let r = dir.path().join("a.raw");
        qemu_img(&["create", "-q", "-f", "qcow2", q.to_str().unwrap(), "64M"]);
        qemu_img(&["create", "-q", "-f", "raw", r.to_str().unwrap(), "64M"]);
        for (p, f) in [(&q, "qcow2"), (&r, "raw")] {
            qemu_io(p, f, "write -P 0x5a 0 1M");
            qemu_io(p, f, "write -P 0x33 40M 3M");
        }
        let opts = ChecksumOptions::default();
        let a = image_checksum(&q, DiskFormat::Qcow2, &opts, None)
            .await
            .unwrap();
        let b = image_checksum(&r, DiskFormat::Raw, &opts, None)
            .await
            .unwrap();
        assert_eq!(a.sha256, b.sha256);
        assert_eq!(a.size_bytes, 64 << 20);
        assert!(a.zero_bytes >= 50 << 20, "sparse ranges not read: {a:?}");
        // Independently: the same digest as hashing the raw file's bytes.
        let bytes = std::fs::read(&r).unwrap();
        assert_eq!(a.sha256, hex::encode(Sha256::digest(&bytes)));
        qemu_io(&q, "qcow2", "write -P 0x5b 40M 1");
        let c = image_checksum(&q, DiskFormat::Qcow2, &opts, None)
            .await
            .unwrap();
        assert_ne!(a.sha256, c.sha256);
        // Nothing left behind: no socket directory, no qemu-nbd.
        assert_no_leftovers(&q);
    }

    #[tokio::test]
    async fn failures_name_the_cause_and_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let opts = ChecksumOptions {
            socket_dir: Some(dir.path().to_path_buf()),
            ..ChecksumOptions::default()
        };
        let missing = dir.path().join("missing.qcow2");
        let err = image_checksum(&missing, DiskFormat::Qcow2, &opts, None)
            .await
            .unwrap_err();
        assert_eq!(err.code(), "image-not-found");
        // Not a qcow2: qemu-nbd refuses to open it.
        let junk = dir.path().join("junk.qcow2");
        std::fs::write(&junk, b"not an image").unwrap();
        let err = image_checksum(&junk, DiskFormat::Qcow2, &opts, None)
            .await
            .unwrap_err();
        assert_eq!(err.code(), "storage-tool-failed", "{err}");
        assert!(!err.hint().is_empty());
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().starts_with("ferry-sum-"))
            .collect();
        assert!(left.is_empty(), "socket dirs left: {left:?}");
        assert_no_leftovers(&junk);
    }

    fn assert_no_leftovers(image: &Path) {
        // The child is reaped asynchronously after a kill; give it a moment.
        for _ in 0..50 {
            if crate::testutil::processes_with_arg(image).is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "processes still use {}: {:?}",
            image.display(),
            crate::testutil::processes_with_arg(image)
        );
    }
}
