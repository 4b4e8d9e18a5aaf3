//! `ferry token create|list|revoke` with the real binary against a real server on a temporary
//! database (no lab): a created token works with its role, is listed without its secret, and
//! is refused right after `revoke`; bad roles and lifetimes are refused before any request.

use std::net::SocketAddr;
use std::process::{Command, Output};

use ferry_cli::commands::lab::server_config;

const ADMIN: &str = "admin-token-for-token-tests-01234";
const JOIN: &str = "join-token-for-token-tests-012345";

/// Runs `ferry ARGS --url URL --token TOKEN` off the async workers, trusting the server's CA.
async fn ferry(server: &ferry_server::ServerHandle, token: &str, args: &[&str]) -> Output {
    let (url, token, ca) = (server.url(), token.to_string(), server.ca_file());
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(&args)
            .args(["--url", &url, "--token", &token])
            .env_remove("FERRY_CONFIG")
            .env("FERRY_CA", &ca)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_tokens_from_the_cli_work_with_their_role_until_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let server = ferry_server::start(server_config(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        dir.path().join("ferry.db"),
        ADMIN,
        JOIN,
    ))
    .await
    .expect("server starts");

    let out = ferry(
        &server,
        ADMIN,
        &[
            "token",
            "create",
            "ci",
            "--role",
            "operator",
            "--expires",
            "12h",
        ],
    )
    .await;
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let secret = stdout.lines().next().unwrap().trim().to_string();
    assert!(secret.starts_with("ferry_"), "{stdout}");
    assert!(
        stdout.contains("operator") && stdout.contains("not shown again"),
        "{stdout}"
    );

    let out = ferry(&server, ADMIN, &["token", "list"]).await;
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    for column in ["NAME", "ROLE", "CREATED", "EXPIRES", "LAST USED"] {
        assert!(stdout.contains(column), "{stdout}");
    }
    assert!(
        stdout.contains("ci") && stdout.contains("operator"),
        "{stdout}"
    );
    assert!(
        !stdout.contains(&secret) && !stdout.contains(ADMIN),
        "{stdout}"
    );

    // The operator reads, and is refused admin work with the role it needs (exit 5).
    let out = ferry(&server, &secret, &["host", "list"]).await;
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let out = ferry(&server, &secret, &["token", "list"]).await;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(
        stderr.contains("error[forbidden]") && stderr.contains("needs the admin role"),
        "{stderr}"
    );

    let out = ferry(&server, ADMIN, &["token", "revoke", "ci"]).await;
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stdout.contains("revoked token ci"), "{stdout}");
    let out = ferry(&server, &secret, &["host", "list"]).await;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("error[unauthorized]"), "{stderr}");
    assert!(!stderr.contains(&secret), "{stderr}");

    // Refused before a request is sent.
    for args in [
        &["token", "create", "x", "--role", "root"][..],
        &[
            "token",
            "create",
            "x",
            "--role",
            "reader",
            "--expires",
            "30",
        ][..],
    ] {
        let out = ferry(&server, ADMIN, args).await;
        let (_, stderr) = text(&out);
        assert_ne!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(
            stderr.contains("admin, operator or reader") || stderr.contains("token lifetime"),
            "{stderr}"
        );
    }
    server.shutdown().await;
}
