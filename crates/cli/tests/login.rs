//! `ferry login` and the CLI's trust in the server: never a certificate accepted silently, a
//! fingerprint pinned only when the user says so, a changed certificate refused afterwards.
//! Runs the real binary against real servers on temporary databases; no lab.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use ferry_cli::commands::lab::server_config;

const ADMIN: &str = "admin-token-for-login-test-012345";
const JOIN: &str = "join-token-for-login-test-0123456";

fn ferry(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .env("FERRY_CONFIG", config)
        .env_remove("FERRY_URL")
        .env_remove("FERRY_TOKEN")
        .env_remove("FERRY_CA")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn server(dir: &Path) -> ferry_server::ServerHandle {
    ferry_server::start(server_config(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        dir.join("ferry.db"),
        ADMIN,
        JOIN,
    ))
    .await
    .expect("server starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_pins_the_fingerprint_only_when_told_and_refuses_a_changed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (d1, d2) = (dir.path().join("s1"), dir.path().join("s2"));
    std::fs::create_dir_all(&d1).unwrap();
    std::fs::create_dir_all(&d2).unwrap();
    let s1 = server(&d1).await;
    let s2 = server(&d2).await;
    let config = dir.path().join("cli.toml");
    std::fs::write(&config, "").unwrap();
    let url = s1.url();
    let fp = s1.state.pki.ca.fingerprint();

    let run = |args: Vec<String>| {
        let config = config.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                ferry(&config, &args)
            })
            .await
            .unwrap()
        }
    };
    let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    // Without any trust the CLI refuses the server's certificate.
    let out = run(args(&["host", "list", "--url", &url, "--token", ADMIN])).await;
    assert_ne!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("server-certificate-untrusted"),
        "{}",
        describe(&out)
    );

    // Not a terminal and no --accept-fingerprint: shown, not trusted.
    let out = run(args(&["login", "--url", &url, "--token", ADMIN])).await;
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_ne!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        err.contains("server-certificate-unknown") && err.contains(&fp),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        "",
        "nothing stored"
    );

    // The wrong fingerprint: refused.
    let wrong = s2.state.pki.ca.fingerprint();
    let out = run(args(&[
        "login",
        "--url",
        &url,
        "--token",
        ADMIN,
        "--accept-fingerprint",
        &wrong,
    ]))
    .await;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("server-certificate-changed"),
        "{}",
        describe(&out)
    );

    // The right one: stored (0600), and the next commands need nothing else.
    let out = run(args(&[
        "login",
        "--url",
        &url,
        "--token",
        ADMIN,
        "--accept-fingerprint",
        &fp,
    ]))
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let stored = std::fs::read_to_string(&config).unwrap();
    assert!(stored.contains(&fp) && stored.contains(&url), "{stored}");
    let mode = std::fs::metadata(&config).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let out = run(args(&["host", "list"])).await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));

    // The same address now answered by a server with another CA: refused with its code.
    let moved = stored.replace(&url, &s2.url());
    std::fs::write(&config, moved).unwrap();
    let out = run(args(&["host", "list"])).await;
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_ne!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(err.contains("server-certificate-changed"), "{err}");
    assert!(err.contains("hint:"), "{err}");

    // FERRY_CA works without any login.
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["host", "list", "--url", &s2.url(), "--token", ADMIN])
        .env("FERRY_CONFIG", dir.path().join("none.toml"))
        .env("FERRY_CA", s2.ca_file())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    s1.shutdown().await;
    s2.shutdown().await;
}
