//! `ferry host list | true`: the reader closes the pipe before the output is written. The CLI
//! must end quietly (141, as a shell reports a program stopped by SIGPIPE), not panic with
//! exit 101. Runs the real binary against a real server on a temporary database; no lab.

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Stdio};

use ferry_cli::commands::lab::server_config;
use ferry_cli::error::exit;

const ADMIN: &str = "admin-token-for-pipe-test-0123456";
const JOIN: &str = "join-token-for-pipe-test-01234567";

/// The write end of a pipe whose read end is already closed.
fn closed_pipe() -> OwnedFd {
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills two fds on success; each is owned exactly once below.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both fds were just created by pipe(2) and are not used elsewhere.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    write
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_ends_the_cli_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let server = ferry_server::start(server_config(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        dir.path().join("ferry.db"),
        ADMIN,
        JOIN,
    ))
    .await
    .expect("server starts");
    let url = server.url();
    let ca = server.ca_file();
    for args in [&["host", "list"][..], &["host", "list", "-o", "json"][..]] {
        let (url, args, ca) = (url.clone(), args.to_vec(), ca.clone());
        let out = tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_ferry"))
                .args(&args)
                .args(["--url", &url, "--token", ADMIN])
                .env("FERRY_CA", &ca)
                .stdout(Stdio::from(closed_pipe()))
                .stderr(Stdio::piped())
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert_eq!(
            out.status.code(),
            Some(i32::from(exit::STDOUT_CLOSED)),
            "{stderr}"
        );
        assert!(stderr.is_empty(), "quiet: {stderr}");
    }
    server.shutdown().await;
}
