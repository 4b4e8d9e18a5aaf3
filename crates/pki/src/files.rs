//! Private files: the PKI directory is 0700 and every file in it 0600, written to a temporary
//! name and renamed, so a crash never leaves half a key and no other local user can read one.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::PkiError;

/// Creates `dir` (0700) or narrows an existing one to 0700.
pub fn ensure_private_dir(dir: &Path) -> Result<(), PkiError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(PkiError::io(dir))
}

/// Writes `bytes` to `path` with mode 0600 through a temporary file and a rename.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(PkiError::io(&tmp))?;
    // An existing temporary file keeps its old mode through open(); set it explicitly.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .and_then(|()| f.write_all(bytes))
        .and_then(|()| f.sync_all())
        .map_err(PkiError::io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(PkiError::io(path))
}

/// Reads a PEM (or other text) file.
pub fn read_text(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(PkiError::io(path))
}
