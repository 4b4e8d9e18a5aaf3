//! What the lab's real-QEMU tests share.

use std::process::Command;

/// The QEMU binary the tests start directly.
pub const QEMU: &str = "qemu-system-x86_64";

/// Fails at once, saying what is missing, when the test cannot run here: CI has root and
/// QEMU, so a test never skips itself quietly.
pub fn require_root_and_qemu() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root (scripts/test runs it with sudo)"
    );
    let ok = Command::new(QEMU)
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success());
    assert!(ok, "{QEMU} not found: scripts/setup installs it");
}
