//! A daemon's log in a file has no colour codes: `ferry server` with stderr redirected (as the
//! lab and systemd run it) and with `--log-file`. Runs the real binary on a loopback port and a
//! temporary database; needs no root.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `ferry server` child, stopped (SIGTERM, then SIGKILL) when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid; no memory-safety preconditions.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn server_config(dir: &Path) -> std::path::PathBuf {
    let config = dir.join("server.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndatabase = \"{}\"\n\
             join_token = \"join-token-for-the-log-test-0123\"\n\
             admin_token = \"admin-token-for-the-log-test-0123\"\n",
            dir.join("ferry.db").display()
        ),
    )
    .unwrap();
    config
}

/// Waits until `path` holds `needle`; the whole text.
fn wait_for(path: &Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_server_logging_to_a_redirected_stderr_writes_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let config = server_config(dir.path());
    let log = dir.path().join("server.log");
    let file = std::fs::File::create(&log).unwrap();
    let _server = Daemon(
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["--log", "info", "server", "--config"])
            .arg(&config)
            .env_remove("NO_COLOR")
            .env_remove("FERRY_LOG_FILE")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap(),
    );
    let text = wait_for(&log, "ferry server listening");
    assert!(text.contains("ferry server listening"), "{text}");
    assert!(text.contains(" INFO "), "levels as plain words: {text}");
    assert!(!text.contains('\x1b'), "colour codes in a file: {text:?}");
}

#[test]
fn a_server_with_log_file_writes_its_log_there_without_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let config = server_config(dir.path());
    let log = dir.path().join("logs.txt");
    let out = dir.path().join("stderr.txt");
    let file = std::fs::File::create(&out).unwrap();
    let _server = Daemon(
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["--log", "info", "server", "--config"])
            .arg(&config)
            .arg("--log-file")
            .arg(&log)
            .env_remove("NO_COLOR")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap(),
    );
    let text = wait_for(&log, "ferry server listening");
    assert!(text.contains("ferry server listening"), "{text}");
    assert!(
        !text.contains('\x1b'),
        "colour codes in --log-file: {text:?}"
    );
    let stderr = std::fs::read_to_string(&out).unwrap();
    assert!(
        !stderr.contains("INFO"),
        "the log goes to the file, not stderr: {stderr}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&log).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the log file is the owner's only");
}

#[test]
fn an_unwritable_log_file_is_one_error_with_a_hint() {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["--log-file", "/nonexistent/dir/ferry.log", "lab", "list"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error[log-file]: "), "{stderr}");
    assert!(stderr.contains("hint: "), "{stderr}");
}
