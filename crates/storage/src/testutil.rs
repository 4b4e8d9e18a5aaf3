//! Helpers of this crate's tests: the QEMU tools run directly, and a look for processes left
//! behind.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `qemu-img ARGS`, panicking with its stderr on failure.
pub fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs one `qemu-io` command (`write -P 0x5a 0 4M`) on an image.
pub fn qemu_io(image: &Path, format: &str, command: &str) {
    let out = Command::new("qemu-io")
        .args(["-f", format, "-c", command])
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-io {command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Pids of live processes with `path` among their arguments (zombies do not count).
pub fn processes_with_arg(path: &Path) -> Vec<u32> {
    let wanted: PathBuf = path.to_path_buf();
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        if status
            .lines()
            .any(|l| l.starts_with("State:") && l.contains('Z'))
        {
            continue;
        }
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let target = wanted.as_os_str().as_encoded_bytes();
        if cmdline.split(|b| *b == 0).any(|a| a == target) {
            found.push(pid);
        }
    }
    found
}
