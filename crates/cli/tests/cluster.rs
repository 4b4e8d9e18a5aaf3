//! The CLI against a real cluster on this machine (root and QEMU needed): `ferry lab up` starts
//! a server and two agents as daemons with a running guest, the REST commands drive a live
//! migration, and `ferry lab down` leaves nothing behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn ferry(config: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
    // Isolate from the caller's shell and config file.
    c.env("FERRY_CONFIG", config)
        .env_remove("FERRY_URL")
        .env_remove("FERRY_TOKEN")
        .env_remove("FERRY_LAB_DIR");
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// Runs `ferry lab down` when dropped, also when an assertion failed.
struct LabGuard {
    name: String,
    config: PathBuf,
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        let _ = ferry(&self.config)
            .args(["lab", "down", "--name", &self.name])
            .output();
    }
}

fn namespaces_of(lab: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    text(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("ferry-{lab}-")))
        .map(String::from)
        .collect()
}

/// Processes whose command line names the lab directory: the daemons (their config files) and
/// the QEMUs (their run directories under the agents' state dirs).
fn processes_of(dir: &str) -> String {
    let out = Command::new("pgrep")
        .args(["-af", &format!("{dir}/")])
        .output()
        .unwrap();
    text(&out.stdout)
        .lines()
        .filter(|l| !l.contains("pgrep"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn lab_cluster_migrates_through_the_cli_and_cleans_up() {
    let name = format!("c{}", std::process::id());
    let dir = format!("/var/tmp/ferry-lab/{name}");
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("cli.toml");
    std::fs::write(&config, "").unwrap();
    let guard = LabGuard {
        name: name.clone(),
        config: config.clone(),
    };

    let up = ferry(&config)
        .args(["lab", "up", "--name", &name, "--hosts", "2"])
        .output()
        .unwrap();
    assert!(up.status.success(), "lab up: {}", describe(&up));
    let exports = text(&up.stdout);
    let var = |key: &str| {
        exports
            .lines()
            .find_map(|l| l.strip_prefix(&format!("export {key}=")))
            .unwrap_or_else(|| panic!("no {key} in {exports}"))
            .to_string()
    };
    let (url, token) = (var("FERRY_URL"), var("FERRY_TOKEN"));
    let run = |args: &[&str]| {
        ferry(&config)
            .env("FERRY_URL", &url)
            .env("FERRY_TOKEN", &token)
            .args(args)
            .output()
            .unwrap()
    };
    let json = |args: &[&str]| {
        let out = run(args);
        assert!(out.status.success(), "{args:?}: {}", describe(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", describe(&out)))
    };

    let hosts = json(&["host", "list", "-o", "json"]);
    let hosts = hosts.as_array().unwrap();
    assert_eq!(hosts.len(), 2, "{hosts:?}");
    assert!(hosts.iter().all(|h| h["state"] == "online"), "{hosts:?}");

    let list = run(&["instance", "list"]);
    assert!(list.status.success(), "{}", describe(&list));
    let listing = text(&list.stdout);
    assert!(listing.starts_with("ID  "), "{listing}");
    let row: Vec<&str> = listing
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("vm1"))
        .unwrap_or_else(|| panic!("no vm1 in {listing}"))
        .split_whitespace()
        .collect();
    assert_eq!(&row[2..4], ["hv1", "running"], "{listing}");

    // Pre-flight checks: print, exit 0 when fit, change nothing.
    let check = run(&["migrate", "vm1", "--to", "hv2", "--check"]);
    assert_eq!(check.status.code(), Some(0), "{}", describe(&check));
    let table = text(&check.stdout);
    assert!(table.starts_with("CHECK "), "{table}");
    assert!(
        table.contains("memory ") && table.trim_end().ends_with("hv2 fits"),
        "{table}"
    );
    let one = json(&["migrate", "vm1", "--to", "hv2", "--check", "-o", "json"]);
    assert_eq!(
        (&one["host"], &one["fit"]),
        (&"hv2".into(), &true.into()),
        "{one}"
    );
    let all = json(&["migrate", "vm1", "--check", "-o", "json"]);
    assert_eq!(all[0]["rank"], 1, "{all}");
    assert_eq!(all[0]["host"], "hv2", "{all}");
    let none = json(&["migration", "list", "-o", "json"]);
    assert!(
        none.as_array().unwrap().is_empty(),
        "--check creates no job: {none}"
    );

    let m = json(&["migrate", "vm1", "--to", "hv2", "--wait", "-o", "json"]);
    assert_eq!(m["state"], "completed", "{m}");
    assert_eq!(m["source"], "hv1");
    assert_eq!(m["destination"], "hv2");
    let vm = json(&["instance", "show", "vm1", "-o", "json"]);
    assert_eq!(vm["host"], "hv2", "{vm}");
    assert_eq!(vm["generation"], 1, "{vm}");
    assert_eq!(vm["state"], "running", "{vm}");

    let id = m["id"].as_str().unwrap();
    let logs = run(&["migration", "logs", id]);
    assert!(logs.status.success(), "{}", describe(&logs));
    assert!(!text(&logs.stdout).trim().is_empty(), "{}", describe(&logs));
    // The 8 characters a list shows are enough to name it.
    let short = run(&["migration", "show", &id[..8]]);
    assert!(text(&short.stdout).contains(id), "{}", describe(&short));
    let listed = json(&["migration", "list", "--state", "completed", "-o", "json"]);
    assert!(listed.as_array().unwrap().iter().any(|x| x["id"] == id));

    let missing = run(&["instance", "show", "no-such-vm"]);
    assert_eq!(missing.status.code(), Some(1), "{}", describe(&missing));
    assert!(
        text(&missing.stderr).contains("error[instance-not-found]"),
        "{}",
        describe(&missing)
    );
    let no_token = ferry(&config)
        .env("FERRY_URL", &url)
        .args(["host", "list"])
        .output()
        .unwrap();
    assert_eq!(no_token.status.code(), Some(5), "{}", describe(&no_token));
    assert!(
        text(&no_token.stderr).contains("hint: "),
        "{}",
        describe(&no_token)
    );
    let unreachable = ferry(&config)
        .args([
            "host",
            "list",
            "--url",
            "http://127.0.0.1:1",
            "--token",
            "x",
        ])
        .output()
        .unwrap();
    assert_eq!(
        unreachable.status.code(),
        Some(4),
        "{}",
        describe(&unreachable)
    );

    drop(guard);
    assert!(
        namespaces_of(&name).is_empty(),
        "{:?}",
        namespaces_of(&name)
    );
    assert_eq!(processes_of(&dir), "", "processes of the lab still run");
    assert!(!Path::new(&dir).exists(), "{dir} still exists");
}
