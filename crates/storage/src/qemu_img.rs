//! `qemu-img`: create, inspect and copy images.
//!
//! Thin async wrappers around the `qemu-img` binary (Debian's `qemu-utils`), the one tool that
//! reads and writes every image format QEMU opens, so Ferry never parses a qcow2 header
//! itself. Policy (which file, which datastore, how much room) stays with the caller; what
//! this module guarantees is that a new image never replaces an existing file: `create` and
//! `convert` write under a temporary name in the target's directory and then link it to the
//! final name, which fails if that name exists (atomic even on NFS), and the temporary file is
//! removed on every path out, including a cancelled future.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ferry_qemu::DiskFormat;
use serde::Deserialize;

/// How long an inspection may take: `qemu-img info` reads a few headers, so a longer wait
/// means a hung file system, which should be reported rather than waited for.
const INFO_TIMEOUT: Duration = Duration::from_secs(60);
/// Creating an image writes only metadata (no preallocation).
const CREATE_TIMEOUT: Duration = Duration::from_secs(120);
/// Stderr kept in an error message.
const MAX_STDERR: usize = 2000;

/// Why a `qemu-img` operation failed. Each variant has a stable [`QemuImgError::code`] and a
/// [`QemuImgError::hint`], so the agent can pass them to an operator unchanged.
#[derive(Debug, thiserror::Error)]
pub enum QemuImgError {
    /// The `qemu-img` binary could not be run at all.
    #[error("cannot run {binary}: {source}")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    /// The image file does not exist.
    #[error("{} does not exist", path.display())]
    NotFound { path: PathBuf },
    /// The target of a create or convert exists; it was left untouched.
    #[error("{} exists already; Ferry never overwrites an image", path.display())]
    Exists { path: PathBuf },
    /// qemu-img cannot read the file as a disk image (not an image, corrupt, wrong format,
    /// a backing file it cannot open).
    #[error("qemu-img cannot read {} as a disk image: {detail}", path.display())]
    Unreadable { path: PathBuf, detail: String },
    /// Another process (a running QEMU) holds the image's write lock.
    #[error("{} is in use by another process: {detail}", path.display())]
    Locked { path: PathBuf, detail: String },
    /// The file system ran out of space while writing.
    #[error("no space left for {}: {detail}", path.display())]
    NoSpace { path: PathBuf, detail: String },
    /// `qemu-img` ran longer than an operation of its kind may take.
    #[error("qemu-img {op} on {} did not finish within {} s", path.display(), limit.as_secs())]
    TimedOut {
        op: &'static str,
        path: PathBuf,
        limit: Duration,
    },
    /// `qemu-img` failed for another reason; its own message says which.
    #[error("qemu-img {op} on {} failed: {detail}", path.display())]
    Failed {
        op: &'static str,
        path: PathBuf,
        detail: String,
    },
    /// `qemu-img` answered with JSON this module does not understand.
    #[error("unexpected output of qemu-img {op} on {}: {detail}", path.display())]
    BadOutput {
        op: &'static str,
        path: PathBuf,
        detail: String,
    },
    /// A file operation around qemu-img (temporary file, link, removal) failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl QemuImgError {
    /// A stable, kebab-case identifier of the error kind.
    pub fn code(&self) -> &'static str {
        match self {
            QemuImgError::Spawn { .. } => "qemu-img-missing",
            QemuImgError::NotFound { .. } => "image-not-found",
            QemuImgError::Exists { .. } => "disk-exists",
            QemuImgError::Unreadable { .. } => "image-unreadable",
            QemuImgError::Locked { .. } => "disk-in-use",
            QemuImgError::NoSpace { .. } => "no-room",
            QemuImgError::TimedOut { .. } => "qemu-img-timeout",
            QemuImgError::Failed { .. } => "qemu-img-failed",
            QemuImgError::BadOutput { .. } => "qemu-img-output",
            QemuImgError::Io { .. } => "image-io",
        }
    }

    /// What the operator can do about it.
    pub fn hint(&self) -> &'static str {
        match self {
            QemuImgError::Spawn { .. } => {
                "install qemu-img (Debian package qemu-utils; scripts/setup does it)"
            }
            QemuImgError::NotFound { .. } => "give the full path of an existing image",
            QemuImgError::Exists { .. } => {
                "remove or rename the file if nothing uses it, or pick another name"
            }
            QemuImgError::Unreadable { .. } => {
                "check the file with `qemu-img info`; give its format if it is raw"
            }
            QemuImgError::Locked { .. } => "stop the instance that uses the image first",
            QemuImgError::NoSpace { .. } => "free space on the datastore or pick another one",
            QemuImgError::TimedOut { .. } => {
                "check that the datastore's file system answers (a hung NFS mount?)"
            }
            QemuImgError::Failed { .. } => "the message is qemu-img's own; check the file",
            QemuImgError::BadOutput { .. } => "check that qemu-img is version 5.0 or later",
            QemuImgError::Io { .. } => "check the datastore's permissions and free space",
        }
    }
}

/// What `qemu-img info --output=json` says about one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub filename: String,
    /// As qemu-img names it (`qcow2`, `raw`, `vmdk`, ...); see [`ImageInfo::disk_format`].
    pub format: String,
    /// What the guest sees.
    pub virtual_size: u64,
    /// Bytes allocated on the file system, when the file system says.
    pub actual_size: Option<u64>,
    /// The backing file as written in the image header (maybe relative to the image).
    pub backing_filename: Option<String>,
    /// The backing file resolved to a path qemu-img opens.
    pub full_backing_filename: Option<String>,
    pub backing_format: Option<String>,
    /// A qcow2 image with lazy refcounts that was not closed cleanly.
    pub dirty: bool,
    /// The image header says it is corrupt (qcow2's `corrupt` bit).
    pub corrupt: bool,
    pub encrypted: bool,
    pub cluster_size: Option<u64>,
}

impl ImageInfo {
    /// The format as Ferry's disks know it; `None` for formats QEMU reads but Ferry does not
    /// attach directly (they can be copied into qcow2).
    pub fn disk_format(&self) -> Option<DiskFormat> {
        self.format.parse().ok()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawInfo {
    filename: String,
    format: String,
    virtual_size: u64,
    #[serde(default)]
    actual_size: Option<u64>,
    #[serde(default)]
    backing_filename: Option<String>,
    #[serde(default)]
    full_backing_filename: Option<String>,
    #[serde(default)]
    backing_filename_format: Option<String>,
    #[serde(default)]
    dirty_flag: bool,
    #[serde(default)]
    encrypted: bool,
    #[serde(default)]
    cluster_size: Option<u64>,
    #[serde(default)]
    format_specific: Option<serde_json::Value>,
}

impl From<RawInfo> for ImageInfo {
    fn from(r: RawInfo) -> ImageInfo {
        let corrupt = r
            .format_specific
            .as_ref()
            .and_then(|f| f.pointer("/data/corrupt"))
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        ImageInfo {
            filename: r.filename,
            format: r.format,
            virtual_size: r.virtual_size,
            actual_size: r.actual_size,
            backing_filename: r.backing_filename,
            full_backing_filename: r.full_backing_filename,
            backing_format: r.backing_filename_format,
            dirty: r.dirty_flag,
            corrupt,
            encrypted: r.encrypted,
            cluster_size: r.cluster_size,
        }
    }
}

/// Parses the output of `qemu-img info --output=json` (one object).
pub fn parse_info(json: &str) -> Result<ImageInfo, serde_json::Error> {
    serde_json::from_str::<RawInfo>(json).map(ImageInfo::from)
}

/// Parses the output of `qemu-img info --output=json --backing-chain` (an array, the image
/// first, then its backing file, and so on).
pub fn parse_info_chain(json: &str) -> Result<Vec<ImageInfo>, serde_json::Error> {
    serde_json::from_str::<Vec<RawInfo>>(json).map(|v| v.into_iter().map(ImageInfo::from).collect())
}

/// What `qemu-img check` found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CheckReport {
    /// Metadata errors that make data unreadable or wrong.
    #[serde(default)]
    pub corruptions: u64,
    /// Clusters allocated but unused: wasted space, harmless.
    #[serde(default)]
    pub leaks: u64,
    /// Errors of the check itself (I/O errors reading the image).
    #[serde(default)]
    pub check_errors: u64,
}

impl CheckReport {
    /// Whether every byte the guest wrote reads back as written.
    pub fn is_clean(&self) -> bool {
        self.corruptions == 0 && self.check_errors == 0
    }
}

/// The `qemu-img` binary and the operations Ferry needs from it.
#[derive(Debug, Clone)]
pub struct QemuImg {
    binary: PathBuf,
}

impl Default for QemuImg {
    /// `qemu-img` from `PATH`.
    fn default() -> Self {
        QemuImg::new("qemu-img")
    }
}

impl QemuImg {
    /// `binary` is a path or a name looked up in `PATH`.
    pub fn new(binary: impl Into<PathBuf>) -> QemuImg {
        QemuImg {
            binary: binary.into(),
        }
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// Creates a new, empty (sparse) image at `path`, or a qcow2 overlay on `backing`.
    ///
    /// `size` is the virtual size; it may be absent only for an overlay, which then gets its
    /// base's size. `backing` is `(path as written into the overlay's header, format)`: a path
    /// relative to `path`'s directory keeps the overlay valid on hosts that mount the datastore
    /// elsewhere. Fails with [`QemuImgError::Exists`] if `path` exists, without touching it.
    pub async fn create(
        &self,
        path: &Path,
        format: DiskFormat,
        size: Option<u64>,
        backing: Option<(&Path, DiskFormat)>,
    ) -> Result<(), QemuImgError> {
        refuse_existing(path)?;
        let tmp = TempFile::beside(path)?;
        let mut args: Vec<OsString> = vec!["create".into(), "-q".into(), "-f".into()];
        args.push(format.as_str().into());
        if let Some((base, base_format)) = backing {
            args.extend(["-b".into(), base.as_os_str().to_owned(), "-F".into()]);
            args.push(base_format.as_str().into());
        }
        args.push(tmp.path().as_os_str().to_owned());
        match (size, backing) {
            (Some(size), _) => args.push(size.to_string().into()),
            (None, Some(_)) => {}
            (None, None) => {
                return Err(QemuImgError::Failed {
                    op: "create",
                    path: path.to_path_buf(),
                    detail: "a new image without a backing file needs a size".into(),
                })
            }
        }
        let out = self
            .run(&args, Some(CREATE_TIMEOUT), "create", path)
            .await?;
        if !out.status.success() {
            return Err(classify("create", path, &out.stderr));
        }
        tmp.publish(path)
    }

    /// Inspects `path` (with `--force-share`, so an image a running QEMU holds can be read
    /// too). `format` skips probing; without it qemu-img guesses, and a file that is no image
    /// at all reads as `raw`, which callers must judge themselves.
    pub async fn info(
        &self,
        path: &Path,
        format: Option<DiskFormat>,
    ) -> Result<ImageInfo, QemuImgError> {
        let out = self.info_output(path, format, false).await?;
        parse_info(&out).map_err(|e| QemuImgError::BadOutput {
            op: "info",
            path: path.to_path_buf(),
            detail: e.to_string(),
        })
    }

    /// Like [`QemuImg::info`] for the image and every image under it (`--backing-chain`): the
    /// image first, then its backing file, and so on. Fails if any of them cannot be opened.
    pub async fn info_chain(
        &self,
        path: &Path,
        format: Option<DiskFormat>,
    ) -> Result<Vec<ImageInfo>, QemuImgError> {
        let out = self.info_output(path, format, true).await?;
        let chain = parse_info_chain(&out).map_err(|e| QemuImgError::BadOutput {
            op: "info",
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        if chain.is_empty() {
            return Err(QemuImgError::BadOutput {
                op: "info",
                path: path.to_path_buf(),
                detail: "an empty backing chain".into(),
            });
        }
        Ok(chain)
    }

    async fn info_output(
        &self,
        path: &Path,
        format: Option<DiskFormat>,
        chain: bool,
    ) -> Result<String, QemuImgError> {
        let mut args: Vec<OsString> = vec!["info".into(), "--output=json".into(), "-U".into()];
        if chain {
            args.push("--backing-chain".into());
        }
        if let Some(f) = format {
            args.extend(["-f".into(), f.as_str().into()]);
        }
        args.push(path.as_os_str().to_owned());
        let out = self.run(&args, Some(INFO_TIMEOUT), "info", path).await?;
        if !out.status.success() {
            return Err(classify("info", path, &out.stderr));
        }
        String::from_utf8(out.stdout).map_err(|e| QemuImgError::BadOutput {
            op: "info",
            path: path.to_path_buf(),
            detail: e.to_string(),
        })
    }

    /// Copies the content of `src` (with its backing chain flattened) into a new image `dst`,
    /// keeping it sparse: zero blocks are not written. Fails with [`QemuImgError::Exists`] if
    /// `dst` exists, and with [`QemuImgError::Locked`] while a running QEMU writes to `src`
    /// (a copy of a disk in use would be torn). Takes as long as the data takes.
    pub async fn convert(
        &self,
        src: &Path,
        src_format: Option<DiskFormat>,
        dst: &Path,
        dst_format: DiskFormat,
    ) -> Result<(), QemuImgError> {
        refuse_existing(dst)?;
        let tmp = TempFile::beside(dst)?;
        let mut args: Vec<OsString> = vec!["convert".into()];
        if let Some(f) = src_format {
            args.extend(["-f".into(), f.as_str().into()]);
        }
        args.extend(["-O".into(), dst_format.as_str().into()]);
        args.push(src.as_os_str().to_owned());
        args.push(tmp.path().as_os_str().to_owned());
        let out = self.run(&args, None, "convert", src).await?;
        if !out.status.success() {
            let err = classify("convert", src, &out.stderr);
            return Err(match err {
                // Running out of room is about the target, not the source.
                QemuImgError::NoSpace { detail, .. } => QemuImgError::NoSpace {
                    path: dst.to_path_buf(),
                    detail,
                },
                e => e,
            });
        }
        tmp.publish(dst)
    }

    /// Checks an image's metadata (`qemu-img check`, read-only). Only qcow2 has metadata to
    /// check; a raw image is always clean.
    pub async fn check(
        &self,
        path: &Path,
        format: DiskFormat,
    ) -> Result<CheckReport, QemuImgError> {
        if format == DiskFormat::Raw {
            return Ok(CheckReport::default());
        }
        let args: Vec<OsString> = vec![
            "check".into(),
            "--output=json".into(),
            "-U".into(),
            "-f".into(),
            format.as_str().into(),
            path.as_os_str().to_owned(),
        ];
        let out = self.run(&args, None, "check", path).await?;
        // Exit 2 means corruptions, 3 leaks: the report says which. Anything else is a
        // failure to check at all.
        match out.status.code() {
            Some(0 | 2 | 3) => {}
            _ => return Err(classify("check", path, &out.stderr)),
        }
        serde_json::from_slice(&out.stdout).map_err(|e| QemuImgError::BadOutput {
            op: "check",
            path: path.to_path_buf(),
            detail: e.to_string(),
        })
    }

    async fn run(
        &self,
        args: &[OsString],
        limit: Option<Duration>,
        op: &'static str,
        path: &Path,
    ) -> Result<std::process::Output, QemuImgError> {
        let child = tokio::process::Command::new(&self.binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A cancelled request must not leave qemu-img writing a file nobody removes.
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| QemuImgError::Spawn {
                binary: self.binary.display().to_string(),
                source,
            })?;
        let waiting = child.wait_with_output();
        let out =
            match limit {
                Some(limit) => tokio::time::timeout(limit, waiting).await.map_err(|_| {
                    QemuImgError::TimedOut {
                        op,
                        path: path.to_path_buf(),
                        limit,
                    }
                })?,
                None => waiting.await,
            };
        out.map_err(|source| QemuImgError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Turns qemu-img's complaint into the error it means.
fn classify(op: &'static str, path: &Path, stderr: &[u8]) -> QemuImgError {
    let text = String::from_utf8_lossy(stderr);
    let mut detail = text.trim().replace('\n', "; ");
    if detail.len() > MAX_STDERR {
        let mut end = MAX_STDERR;
        while !detail.is_char_boundary(end) {
            end -= 1;
        }
        detail.truncate(end);
        detail.push_str("...");
    }
    // qemu-img quotes the file it could not open: the image itself, or a file of its
    // backing chain, which makes the image unreadable rather than missing.
    let about_the_image = text.contains(&format!("'{}'", path.display()));
    let path = path.to_path_buf();
    let lower = detail.to_ascii_lowercase();
    if lower.contains("no space left on device") {
        QemuImgError::NoSpace { path, detail }
    } else if lower.contains("lock") && lower.contains("another process") {
        QemuImgError::Locked { path, detail }
    } else if op == "info" && lower.contains("no such file or directory") && about_the_image {
        QemuImgError::NotFound { path }
    } else if op == "info" || op == "check" || (op == "convert" && lower.contains("could not open"))
    {
        QemuImgError::Unreadable { path, detail }
    } else {
        QemuImgError::Failed { op, path, detail }
    }
}

fn refuse_existing(path: &Path) -> Result<(), QemuImgError> {
    match path.symlink_metadata() {
        Ok(_) => Err(QemuImgError::Exists {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(QemuImgError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// A file under a temporary name beside its final one, removed when dropped unless it was
/// published.
#[derive(Debug)]
pub struct TempFile {
    path: PathBuf,
}

impl TempFile {
    /// A fresh temporary name in `target`'s directory (same file system, so the final link
    /// is possible). Hidden and marked so an operator recognises a leftover of a crash.
    pub fn beside(target: &Path) -> Result<TempFile, QemuImgError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let dir = target.parent().unwrap_or(Path::new("."));
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(
            ".{name}.ferry-tmp-{}-{n}-{nanos}",
            std::process::id()
        ));
        refuse_existing(&path)?;
        Ok(TempFile { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Gives the file its final name without ever replacing a file there: a hard link fails
    /// if the name exists (also on NFS, where it is the classic atomic create). A file system
    /// without hard links gets a rename after a check, which is not atomic against another
    /// host but never replaces a file that existed before the check.
    pub fn publish(self, target: &Path) -> Result<(), QemuImgError> {
        match std::fs::hard_link(&self.path, target) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(QemuImgError::Exists {
                path: target.to_path_buf(),
            }),
            Err(link_err) => {
                refuse_existing(target)?;
                std::fs::rename(&self.path, target).map_err(|_| QemuImgError::Io {
                    path: target.to_path_buf(),
                    source: link_err,
                })
            }
        }
        // Dropping `self` removes the temporary name (or finds it renamed away).
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn qemu_img() -> QemuImg {
        QemuImg::default()
    }

    /// Files in `dir` (names), sorted: proves no temporary file is left behind.
    fn files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn create_makes_sparse_images_of_the_asked_size() {
        let dir = tempfile::tempdir().unwrap();
        let q = qemu_img();
        for format in [DiskFormat::Qcow2, DiskFormat::Raw] {
            let path = dir.path().join(format!("a.{format}"));
            q.create(&path, format, Some(64 * MIB), None).await.unwrap();
            let info = q.info(&path, None).await.unwrap();
            assert_eq!(info.disk_format(), Some(format));
            assert_eq!(info.virtual_size, 64 * MIB);
            assert!(info.actual_size.unwrap() < 4 * MIB, "{info:?}");
            assert_eq!(info.backing_filename, None);
            assert!(!info.corrupt && !info.dirty);
        }
        assert_eq!(files(dir.path()), ["a.qcow2", "a.raw"]);
    }

    #[tokio::test]
    async fn create_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("taken.qcow2");
        std::fs::write(&path, b"precious").unwrap();
        let err = qemu_img()
            .create(&path, DiskFormat::Qcow2, Some(MIB), None)
            .await
            .unwrap_err();
        assert_eq!(err.code(), "disk-exists", "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
        // A file appearing between the check and the publish is not replaced either.
        let tmp = TempFile::beside(&path).unwrap();
        std::fs::write(tmp.path(), b"new").unwrap();
        let tmp_path = tmp.path().to_path_buf();
        assert_eq!(tmp.publish(&path).unwrap_err().code(), "disk-exists");
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
        assert!(!tmp_path.exists());
        assert_eq!(files(dir.path()), ["taken.qcow2"]);
    }

    #[tokio::test]
    async fn overlays_take_their_base_size_and_name_it_relatively() {
        let dir = tempfile::tempdir().unwrap();
        let q = qemu_img();
        let base = dir.path().join("base.raw");
        q.create(&base, DiskFormat::Raw, Some(32 * MIB), None)
            .await
            .unwrap();
        let overlay = dir.path().join("vm-disk0.qcow2");
        q.create(
            &overlay,
            DiskFormat::Qcow2,
            None,
            Some((Path::new("base.raw"), DiskFormat::Raw)),
        )
        .await
        .unwrap();
        let info = q.info(&overlay, Some(DiskFormat::Qcow2)).await.unwrap();
        assert_eq!(info.virtual_size, 32 * MIB);
        assert_eq!(info.backing_filename.as_deref(), Some("base.raw"));
        assert_eq!(info.backing_format.as_deref(), Some("raw"));
        let full = PathBuf::from(info.full_backing_filename.unwrap());
        assert_eq!(full.canonicalize().unwrap(), base.canonicalize().unwrap());
        let chain = q.info_chain(&overlay, None).await.unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[1].format, "raw");
        // A bigger overlay than its base is fine.
        let big = dir.path().join("big.qcow2");
        q.create(
            &big,
            DiskFormat::Qcow2,
            Some(64 * MIB),
            Some((Path::new("base.raw"), DiskFormat::Raw)),
        )
        .await
        .unwrap();
        assert_eq!(q.info(&big, None).await.unwrap().virtual_size, 64 * MIB);
        // A missing base is refused, and nothing is left.
        let err = q
            .create(
                &dir.path().join("orphan.qcow2"),
                DiskFormat::Qcow2,
                None,
                Some((Path::new("nothere.qcow2"), DiskFormat::Qcow2)),
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), "qemu-img-failed", "{err}");
        assert_eq!(
            files(dir.path()),
            ["base.raw", "big.qcow2", "vm-disk0.qcow2"]
        );
    }

    #[tokio::test]
    async fn info_tells_missing_from_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let q = qemu_img();
        let err = q
            .info(&dir.path().join("missing.qcow2"), None)
            .await
            .unwrap_err();
        assert_eq!(err.code(), "image-not-found", "{err}");
        // A text file probes as raw: callers judge that. Asked as qcow2 it is unreadable.
        let text = dir.path().join("notes.txt");
        std::fs::write(&text, "hello\n").unwrap();
        assert_eq!(q.info(&text, None).await.unwrap().format, "raw");
        let err = q.info(&text, Some(DiskFormat::Qcow2)).await.unwrap_err();
        assert_eq!(err.code(), "image-unreadable", "{err}");
        // An overlay whose base is gone cannot be read as a chain.
        let base = dir.path().join("base.qcow2");
        q.create(&base, DiskFormat::Qcow2, Some(MIB), None)
            .await
            .unwrap();
        let overlay = dir.path().join("ov.qcow2");
        q.create(
            &overlay,
            DiskFormat::Qcow2,
            None,
            Some((Path::new("base.qcow2"), DiskFormat::Qcow2)),
        )
        .await
        .unwrap();
        std::fs::remove_file(&base).unwrap();
        let err = q.info_chain(&overlay, None).await.unwrap_err();
        assert_eq!(err.code(), "image-unreadable", "{err}");
    }

    #[tokio::test]
    async fn convert_copies_content_sparsely_and_flattens_backing() {
        let dir = tempfile::tempdir().unwrap();
        let q = qemu_img();
        // A raw image with a little data at 1 MiB.
        let src = dir.path().join("src.raw");
        {
            use std::io::{Seek, SeekFrom, Write};
            let mut f = std::fs::File::create(&src).unwrap();
            f.set_len(16 * MIB).unwrap();
            f.seek(SeekFrom::Start(MIB)).unwrap();
            f.write_all(&[0xab; 4096]).unwrap();
        }
        let overlay = dir.path().join("ov.qcow2");
        q.create(
            &overlay,
            DiskFormat::Qcow2,
            None,
            Some((Path::new("src.raw"), DiskFormat::Raw)),
        )
        .await
        .unwrap();
        let copy = dir.path().join("copy.qcow2");
        q.convert(&overlay, Some(DiskFormat::Qcow2), &copy, DiskFormat::Qcow2)
            .await
            .unwrap();
        let info = q.info(&copy, None).await.unwrap();
        assert_eq!(info.virtual_size, 16 * MIB);
        assert_eq!(info.backing_filename, None, "the copy stands alone");
        assert!(info.actual_size.unwrap() < 2 * MIB, "{info:?}");
        // Back to raw: the bytes are where they were.
        let back = dir.path().join("back.raw");
        q.convert(&copy, None, &back, DiskFormat::Raw)
            .await
            .unwrap();
        let bytes = std::fs::read(&back).unwrap();
        assert_eq!(bytes.len() as u64, 16 * MIB);
        assert!(bytes[MIB as usize..MIB as usize + 4096]
            .iter()
            .all(|b| *b == 0xab));
        assert!(bytes[..MIB as usize].iter().all(|b| *b == 0));
        // Never onto an existing file.
        let err = q
            .convert(&src, None, &back, DiskFormat::Raw)
            .await
            .unwrap_err();
        assert_eq!(err.code(), "disk-exists");
        // An unreadable source leaves nothing.
        let err = q
            .convert(
                &dir.path().join("nothere"),
                None,
                &dir.path().join("never.qcow2"),
                DiskFormat::Qcow2,
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), "image-unreadable", "{err}");
        assert_eq!(
            files(dir.path()),
            ["back.raw", "copy.qcow2", "ov.qcow2", "src.raw"]
        );
    }

    #[tokio::test]
    async fn check_reports_clean_images() {
        let dir = tempfile::tempdir().unwrap();
        let q = qemu_img();
        let path = dir.path().join("a.qcow2");
        q.create(&path, DiskFormat::Qcow2, Some(MIB), None)
            .await
            .unwrap();
        assert!(q.check(&path, DiskFormat::Qcow2).await.unwrap().is_clean());
        let text = dir.path().join("t.txt");
        std::fs::write(&text, "x").unwrap();
        let err = q.check(&text, DiskFormat::Qcow2).await.unwrap_err();
        assert_eq!(err.code(), "image-unreadable", "{err}");
    }

    #[tokio::test]
    async fn a_missing_binary_says_how_to_install_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = QemuImg::new("/nonexistent/qemu-img")
            .create(
                &dir.path().join("a.qcow2"),
                DiskFormat::Qcow2,
                Some(MIB),
                None,
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), "qemu-img-missing");
        assert!(err.hint().contains("qemu-utils"));
        assert!(files(dir.path()).is_empty());
    }

    #[test]
    fn info_json_parses() {
        let json = r#"{"virtual-size": 1073741824, "filename": "ov.qcow2", "cluster-size": 65536,
            "format": "qcow2", "actual-size": 200704, "backing-filename": "base.qcow2",
            "full-backing-filename": "/srv/base.qcow2", "backing-filename-format": "qcow2",
            "format-specific": {"type": "qcow2", "data": {"corrupt": true}},
            "dirty-flag": false, "children": []}"#;
        let info = parse_info(json).unwrap();
        assert_eq!(info.virtual_size, 1 << 30);
        assert_eq!(info.backing_format.as_deref(), Some("qcow2"));
        assert_eq!(
            info.full_backing_filename.as_deref(),
            Some("/srv/base.qcow2")
        );
        assert!(info.corrupt);
        assert_eq!(info.disk_format(), Some(DiskFormat::Qcow2));
        let vmdk = parse_info(r#"{"virtual-size": 1, "filename": "x", "format": "vmdk"}"#).unwrap();
        assert_eq!(vmdk.disk_format(), None);
        assert!(parse_info("[]").is_err());
    }
}
