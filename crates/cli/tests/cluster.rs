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
        .env_remove("FERRY_CA")
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
    /// Holds the CLI's config file; removed after `lab down`.
    _tmp: tempfile::TempDir,
}

impl LabGuard {
    /// A lab named `PREFIX<pid>` with an empty CLI config of its own, taken down on drop.
    fn new(prefix: &str) -> LabGuard {
        let tmp = tempfile::tempdir().unwrap();
        let config = tmp.path().join("cli.toml");
        std::fs::write(&config, "").unwrap();
        LabGuard {
            name: format!("{prefix}{}", std::process::id()),
            config,
            _tmp: tmp,
        }
    }
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
    let guard = LabGuard::new("c");
    let (name, config) = (guard.name.clone(), guard.config.clone());
    let dir = format!("/var/tmp/ferry-lab/{name}");

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
    let (url, token, ca) = (var("FERRY_URL"), var("FERRY_TOKEN"), var("FERRY_CA"));
    assert!(url.starts_with("https://"), "{url}");
    let run = |args: &[&str]| {
        ferry(&config)
            .env("FERRY_URL", &url)
            .env("FERRY_TOKEN", &token)
            .env("FERRY_CA", &ca)
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
        .env("FERRY_CA", &ca)
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

/// `ferry lab up --name NAME EXTRA...`, its output, and a `ferry` for its API commands.
fn lab_up(name: &str, config: &Path, extra: &[&str]) -> (Output, impl Fn(&[&str]) -> Output) {
    let mut args = vec!["lab", "up", "--name", name];
    args.extend_from_slice(extra);
    let up = ferry(config).args(&args).output().unwrap();
    assert!(up.status.success(), "lab up: {}", describe(&up));
    let exports = text(&up.stdout);
    let var = |key: &str| {
        exports
            .lines()
            .find_map(|l| l.strip_prefix(&format!("export {key}=")))
            .unwrap_or_else(|| panic!("no {key} in {exports}"))
            .to_string()
    };
    let (url, token, ca) = (var("FERRY_URL"), var("FERRY_TOKEN"), var("FERRY_CA"));
    let config = config.to_path_buf();
    let run = move |args: &[&str]| {
        ferry(&config)
            .env("FERRY_URL", &url)
            .env("FERRY_TOKEN", &token)
            .env("FERRY_CA", &ca)
            .args(args)
            .output()
            .unwrap()
    };
    (up, run)
}

fn json_of(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", describe(out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", describe(out)))
}

#[test]
fn lab_up_without_an_instance_suggests_making_one_not_migrating_it() {
    let guard = LabGuard::new("n");
    let (name, config) = (guard.name.clone(), guard.config.clone());
    let (up, run) = lab_up(&name, &config, &["--no-instance"]);
    let said = text(&up.stderr);
    assert!(!said.contains("vm1 running"), "{said}");
    assert!(!said.contains("migrate"), "nothing to migrate yet: {said}");
    assert!(
        said.contains("next: ferry instance create vm1 --lab-guest"),
        "{said}"
    );
    let listed = json_of(&run(&["instance", "list", "-o", "json"]));
    assert_eq!(listed, serde_json::json!([]), "--no-instance made none");
    drop(guard);
    assert!(namespaces_of(&name).is_empty());
}

/// The storage check of `vm1 -> hv2`, and whether any check warns.
fn storage_verdict(candidate: &serde_json::Value) -> (String, String, Vec<String>) {
    let checks = candidate["checks"].as_array().unwrap();
    let storage = checks.iter().find(|c| c["name"] == "storage").unwrap();
    let warns = checks
        .iter()
        .filter(|c| c["status"] == "warn")
        .map(|c| format!("{}: {}", c["name"], c["message"]))
        .collect();
    (
        storage["status"].as_str().unwrap().to_string(),
        storage["message"].as_str().unwrap().to_string(),
        warns,
    )
}

#[test]
fn the_lab_image_store_is_shared_by_its_identity_file_so_nothing_warns() {
    let guard = LabGuard::new("i");
    let (name, config) = (guard.name.clone(), guard.config.clone());
    let dir = format!("/var/tmp/ferry-lab/{name}");
    let (_, run) = lab_up(&name, &config, &[]);

    // Every lab host has the image store, and it carries its identity in a file, not in
    // the agents' configs.
    let stores = json_of(&run(&["datastore", "list", "-o", "json"]));
    let images = stores
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "images")
        .unwrap_or_else(|| panic!("no images datastore: {stores}"));
    assert_eq!(images["shared"], true, "{images}");
    assert_eq!(images["mounts"].as_array().unwrap().len(), 2, "{images}");
    let path = images["mounts"][0]["path"].as_str().unwrap();
    let file = std::fs::read_to_string(Path::new(path).join(".ferry-datastore-id")).unwrap();
    assert_eq!(images["identity"].as_str(), Some(file.trim()), "{images}");
    for host in ["hv1", "hv2"] {
        let agent = std::fs::read_to_string(format!("{dir}/{host}.toml")).unwrap();
        assert!(!agent.contains("identity"), "{agent}");
    }

    let candidate = json_of(&run(&[
        "migrate", "vm1", "--to", "hv2", "--check", "-o", "json",
    ]));
    let (status, message, warns) = storage_verdict(&candidate);
    assert_eq!(status, "pass", "{message}");
    assert!(warns.is_empty(), "the happy path warns: {warns:?}");
    drop(guard);
    assert!(namespaces_of(&name).is_empty());
}

/// The demo's cluster (in this process) has the image store the same way as `lab up`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_clusters_image_store_passes_the_storage_check_without_a_warning() {
    use ferry_api::instances::{CreateInstance, Instance};
    use ferry_bench::local_cluster::{images_datastore, LocalCluster};
    use ferry_lab::image::{ensure_image, ImageOptions};

    ferry_lab::net::remove_orphan_test_labs();
    let opts = ImageOptions::default();
    let cache = opts.cache_dir.clone();
    let (image, _) = tokio::task::spawn_blocking(move || ensure_image(&opts))
        .await
        .unwrap()
        .unwrap();
    let name = ferry_lab::net::unique_test_lab_name();
    let cluster = LocalCluster::start(&name, 2, "tcg", vec![images_datastore(&cache).unwrap()])
        .await
        .unwrap();
    let config = ferry_lab::guest_config::GuestConfig::default();
    let spec = ferry_lab::instance::guest_instance_spec(&image, &config, 256, "52:54:00:00:0a:01");
    let vm: Instance = cluster
        .create_instance(&CreateInstance {
            name: "vm1".into(),
            host: Some("hv1".into()),
            spec,
            disks: vec![],
            start: true,
        })
        .await
        .unwrap();
    let candidates: serde_json::Value = cluster
        .api
        .get(&format!(
            "/v1/instances/{}/migration-candidates?destination=hv2&probe=false",
            vm.id
        ))
        .await
        .unwrap();
    let (status, message, warns) = storage_verdict(&candidates[0]);
    assert_eq!(status, "pass", "{message}");
    assert!(warns.is_empty(), "{warns:?}");
    cluster.shutdown().await;
    assert!(namespaces_of(&name).is_empty());
}

#[test]
fn watch_without_a_terminal_prints_one_line_per_event() {
    let guard = LabGuard::new("w");
    let (name, config) = (guard.name.clone(), guard.config.clone());
    let (_, run) = lab_up(&name, &config, &[]);
    // Output captured: neither stdout nor stderr is a terminal.
    let out = run(&["migrate", "vm1", "--to", "hv2", "--watch"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let err = text(&out.stderr);
    assert!(
        !err.contains('\r') && !err.contains('\x1b'),
        "redrawn: {err:?}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with('[')).collect();
    assert!(lines.len() >= 3, "one line per event: {err}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("] migrating ") && l.contains('%')),
        "progress lines: {err}"
    );
    assert!(lines.last().unwrap().ends_with("] completed"), "{err}");
    // The record still goes to stdout, after the lines.
    assert!(
        text(&out.stdout)
            .lines()
            .any(|l| l.starts_with("state ") && l.ends_with(" completed")),
        "{}",
        describe(&out)
    );
    drop(guard);
}

#[test]
fn migration_show_has_the_settings_qemu_ran_with() {
    let guard = LabGuard::new("q");
    let (name, config) = (guard.name.clone(), guard.config.clone());
    let (_, run) = lab_up(&name, &config, &[]);

    // Manual: exactly the options given, as QEMU reports them back.
    let m = json_of(&run(&[
        "migrate",
        "vm1",
        "--to",
        "hv2",
        "--policy",
        "manual",
        "--downtime-ms",
        "123",
        "--bandwidth",
        "200",
        "--wait",
        "-o",
        "json",
    ]));
    assert_eq!(m["state"], "completed", "{m}");
    let q = &m["qemu_settings"];
    assert_eq!(q["downtime_limit_ms"], 123, "{m}");
    assert_eq!(q["max_bandwidth"], 200u64 << 20, "{m}");
    let caps: Vec<&str> = q["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(caps.contains(&"pause-before-switchover"), "{caps:?}");
    assert!(!caps.contains(&"auto-converge"), "{caps:?}");

    // Auto, nothing asked: what the plan chose, not the request's defaults.
    let m = json_of(&run(&[
        "migrate", "vm1", "--to", "hv1", "--wait", "-o", "json",
    ]));
    assert_eq!(m["state"], "completed", "{m}");
    let planned = &m["plan"]["params"]["downtime_limit_ms"];
    assert!(planned.is_u64(), "{m}");
    assert_eq!(m["qemu_settings"]["downtime_limit_ms"], *planned, "{m}");
    let id = m["id"].as_str().unwrap();
    let shown = run(&["migration", "show", id]);
    let table = text(&shown.stdout);
    let qemu_line = table
        .lines()
        .find(|l| l.starts_with("qemu "))
        .unwrap_or_else(|| panic!("no qemu line: {table}"));
    assert!(
        qemu_line.contains(&format!("pause limit {planned} ms")),
        "{qemu_line}"
    );
    let options = table.lines().find(|l| l.starts_with("options ")).unwrap();
    assert!(
        !options.contains("downtime"),
        "no default as a setting: {options}"
    );
    let logs = text(&run(&["migration", "logs", id]).stdout);
    assert!(
        logs.contains("qemu runs with bandwidth unlimited"),
        "{logs}"
    );
    drop(guard);
}

/// The heartbeat counters (`ferry-hb N MS`) in a console text.
fn heartbeats(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("ferry-hb "))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

#[test]
fn the_console_joins_every_hosts_output_across_migrations() {
    let guard = LabGuard::new("s");
    let (name, config) = (guard.name.clone(), guard.config.clone());
    let dir = format!("/var/tmp/ferry-lab/{name}");
    let (_, run) = lab_up(&name, &config, &[]);
    let console = |args: &[&str]| {
        let mut all = vec!["instance", "console", "vm1", "--bytes", "16777216"];
        all.extend_from_slice(args);
        run(&all)
    };
    // The guest is up once it said so on its console.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !text(&console(&[]).stdout).contains("ferry-guest ready") {
        assert!(std::time::Instant::now() < deadline, "vm1 never got ready");
        std::thread::sleep(std::time::Duration::from_millis(250));
    }

    for to in ["hv2", "hv1"] {
        let m = json_of(&run(&[
            "migrate", "vm1", "--to", to, "--wait", "-o", "json",
        ]));
        assert_eq!(m["state"], "completed", "{m}");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }

    let c = json_of(&console(&["-o", "json"]));
    let segments = c["segments"].as_array().unwrap();
    let hosts: Vec<&str> = segments
        .iter()
        .map(|s| s["host"].as_str().unwrap())
        .collect();
    assert_eq!(hosts, ["hv1", "hv2", "hv1"], "{c}");
    assert!(c.get("unreachable").is_none(), "{c}");
    let texts: Vec<&str> = segments
        .iter()
        .map(|s| s["text"].as_str().unwrap())
        .collect();
    assert!(
        texts[0].contains("ferry-guest ready"),
        "the boot stays: {}",
        texts[0]
    );
    assert!(!texts[1].contains("ferry-guest ready"), "no second boot");
    // The heartbeat goes on where it left off: each host's counters follow the last one's.
    let counts: Vec<Vec<u64>> = texts.iter().map(|t| heartbeats(t)).collect();
    for (i, c) in counts.iter().enumerate() {
        assert!(!c.is_empty(), "segment {i} has heartbeats: {}", texts[i]);
    }
    for pair in counts.windows(2) {
        let (before, after) = (pair[0].last().unwrap(), pair[1].first().unwrap());
        assert!(before < after, "out of order: {before} then {after}");
    }

    // As text: each host's part under a line naming it, in the same order.
    let shown = text(&console(&[]).stdout);
    let marks: Vec<&str> = shown
        .lines()
        .filter(|l| l.starts_with("--- "))
        .map(|l| &l[4..7])
        .collect();
    assert_eq!(marks, ["hv1", "hv2", "hv1"], "{shown}");
    let alias = run(&["instance", "log", "vm1", "--bytes", "100"]);
    assert!(alias.status.success(), "{}", describe(&alias));
    let none = run(&["instance", "console", "vm1", "--bytes", "0"]);
    assert_eq!(none.status.code(), Some(1), "{}", describe(&none));
    assert!(
        text(&none.stderr).starts_with("error[bad-query]: bytes 0 is out of range"),
        "{}",
        describe(&none)
    );

    // Deleting the instance removes its output on every host that ran it.
    let id = json_of(&run(&["instance", "show", "vm1", "-o", "json"]))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let kept = |host: &str| Path::new(&format!("{dir}/agents/{host}/consoles/{id}")).exists();
    assert!(kept("hv1") && kept("hv2"));
    let stop = run(&["instance", "stop", "vm1", "--force"]);
    assert!(stop.status.success(), "{}", describe(&stop));
    let delete = run(&["instance", "delete", "vm1"]);
    assert!(delete.status.success(), "{}", describe(&delete));
    assert!(!kept("hv1") && !kept("hv2"), "console output left behind");
    drop(guard);
}
