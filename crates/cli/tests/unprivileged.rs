//! `ferry demo` run by a user who is not root: it cannot create the lab, so it must say so
//! once (code, sentence, hint) and print no report about a migration that never ran. Runs the
//! binary as `nobody` (through `setpriv`) when the tests run as root; creates nothing.

use std::process::{Command, Output};

fn demo_as_unprivileged_user(args: &[&str]) -> Output {
    let ferry = env!("CARGO_BIN_EXE_ferry");
    // SAFETY: geteuid(2) cannot fail.
    let mut cmd = if unsafe { libc::geteuid() } == 0 {
        let setpriv = ["/usr/bin/setpriv", "/bin/setpriv"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("setpriv (util-linux) runs the demo as nobody");
        let mut c = Command::new(setpriv);
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ]);
        c.arg(ferry);
        c
    } else {
        Command::new(ferry)
    };
    cmd.arg("demo")
        .args(args)
        .env("HOME", "/nonexistent")
        .env_remove("FERRY_CACHE_DIR")
        .env_remove("XDG_CACHE_HOME");
    cmd.output().unwrap()
}

#[test]
fn a_demo_that_cannot_start_prints_one_error_and_no_report() {
    let out = demo_as_unprivileged_user(&["--lab-name", "unpriv"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.trim().is_empty(), "no report: {stdout}");
    assert!(stderr.contains("error[needs-root]"), "{stderr}");
    assert_eq!(stderr.matches("error[").count(), 1, "{stderr}");
    assert_eq!(stderr.matches("hint").count(), 1, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // --json still prints the report object scripts parse, with the error in it.
    let out = demo_as_unprivileged_user(&["--json", "--lab-name", "unpriv"]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["status"], "failed");
    assert_eq!(report["error"]["code"], "needs-root");
}
