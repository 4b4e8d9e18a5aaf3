//! How command lines become requests: parsing, the request bodies the CLI sends, and where the
//! server URL and token come from. No server and no root needed.

use std::net::Ipv4Addr;

use clap::Parser;
use ferry_api::migrations::{MigrationKind, MigrationState};
use ferry_cli::commands::instance::{
    create_request, mac_for, parse_ip_prefix, parse_nic, InstanceCommand, LabImage, NicArg,
};
use ferry_cli::commands::lab::{agent_config, server_config, to_toml};
use ferry_cli::commands::migrate::{
    candidates_path, disk_map, exit_code_for, list_query, parse_disk_mapping, MigrationCommand,
};
use ferry_cli::commands::{seg, ClusterCommand};
use ferry_cli::config::{resolve, FileConfig};
use ferry_cli::error::{exit, CliError};
use ferry_cli::output::OutputFormat;

/// The library's commands under a stand-in top level, as main.rs flattens them.
#[derive(Parser, Debug)]
#[command(name = "ferry")]
struct Top {
    #[command(subcommand)]
    cmd: ClusterCommand,
}

fn parse(args: &[&str]) -> Result<ClusterCommand, String> {
    let mut argv = vec!["ferry"];
    argv.extend_from_slice(args);
    Top::try_parse_from(argv)
        .map(|t| t.cmd)
        .map_err(|e| e.to_string())
}

#[test]
fn api_flags_go_before_or_after_the_subcommand() {
    for argv in [
        &["host", "--url", "http://h:1", "-o", "json", "list"][..],
        &["host", "list", "--url", "http://h:1", "--output", "json"][..],
    ] {
        let ClusterCommand::Host { api, cmd } = parse(argv).unwrap() else {
            panic!("not a host command")
        };
        assert_eq!(api.url.as_deref(), Some("http://h:1"));
        assert_eq!(api.output, OutputFormat::Json);
        assert_eq!(cmd, ferry_cli::commands::host::HostCommand::List);
    }
}

#[test]
fn migrate_flags_build_the_request() {
    let ClusterCommand::Migrate { api, args } = parse(&[
        "migrate",
        "web-1",
        "--to",
        "hv2",
        "--bandwidth",
        "200",
        "--downtime-ms",
        "50",
        "--auto-converge",
        "--compress",
        "--policy",
        "manual",
        "--budget",
        "120",
        "--on-timeout",
        "abort",
        "--xbzrle-cache",
        "64",
        "--parallel",
        "4",
        "--wait",
    ])
    .unwrap() else {
        panic!("not migrate")
    };
    assert_eq!(api.output, OutputFormat::Table);
    assert!(args.wait && !args.watch);
    let req = args.to_request().unwrap();
    assert_eq!(
        serde_json::to_value(&req).unwrap(),
        serde_json::json!({
            "instance": "web-1",
            "destination": "hv2",
            "options": {
                "bandwidth_mib_s": 200,
                "downtime_ms": 50,
                "auto_converge": true,
                "compress": true,
                "post_copy": false,
                "force": false,
                "policy": "manual",
                "budget_s": 120,
                "timeout_action": "abort",
                "xbzrle_cache_mib": 64,
                "parallel": 4
            },
            "kind": "live"
        })
    );
}

#[test]
fn migrate_policy_defaults_to_auto_and_bad_values_are_refused() {
    let ClusterCommand::Migrate { args, .. } = parse(&["migrate", "vm"]).unwrap() else {
        panic!()
    };
    assert_eq!(
        args.to_request().unwrap().options.policy,
        ferry_api::migrations::Policy::Auto
    );
    let err = parse(&["migrate", "vm", "--policy", "fast"]).unwrap_err();
    assert!(err.contains("not a policy"), "{err}");
    let err = parse(&["migrate", "vm", "--on-timeout", "pause"]).unwrap_err();
    assert!(err.contains("not a timeout action"), "{err}");
    // Post-copy as the timeout action needs post-copy permitted.
    let ClusterCommand::Migrate { args, .. } =
        parse(&["migrate", "vm", "--on-timeout", "postcopy"]).unwrap()
    else {
        panic!()
    };
    let err = args.to_request().unwrap_err();
    assert!(err.to_string().contains("post-copy"), "{err}");
}

#[test]
fn migrate_cold_and_conflicts() {
    let ClusterCommand::Migrate { args, .. } =
        parse(&["migrate", "vm", "--to", "hv1", "--cold"]).unwrap()
    else {
        panic!()
    };
    assert_eq!(args.to_request().unwrap().kind, Some(MigrationKind::Cold));
    let err = parse(&["migrate", "vm", "--to", "hv1", "--watch", "--wait"]).unwrap_err();
    assert!(err.contains("cannot be used with"), "{err}");
    // Without --to the server picks the destination.
    let ClusterCommand::Migrate { args, .. } = parse(&["migrate", "vm"]).unwrap() else {
        panic!()
    };
    assert_eq!(args.to_request().unwrap().destination, None);
}

#[test]
fn migrate_check_and_force() {
    let ClusterCommand::Migrate { args, .. } =
        parse(&["migrate", "vm", "--to", "hv2", "--check"]).unwrap()
    else {
        panic!()
    };
    assert!(args.check && !args.force);
    let none = Default::default();
    assert_eq!(
        candidates_path(&args.instance, args.to.as_deref(), &none),
        "/v1/instances/vm/migration-candidates?destination=hv2"
    );
    assert_eq!(
        candidates_path("a b", None, &none),
        "/v1/instances/a%20b/migration-candidates"
    );
    // --check shows the storage mapping the map would give.
    let map = [
        ("disk0".to_string(), "fast".to_string()),
        ("disk1".to_string(), "local".to_string()),
    ]
    .into();
    assert_eq!(
        candidates_path("vm", Some("hv2"), &map),
        "/v1/instances/vm/migration-candidates?destination=hv2&map_disk=disk0%3Dfast%2Cdisk1%3Dlocal"
    );
    let err = parse(&["migrate", "vm", "--check", "--watch"]).unwrap_err();
    assert!(err.contains("cannot be used with"), "{err}");
    let ClusterCommand::Migrate { args, .. } =
        parse(&["migrate", "vm", "--to", "hv2", "--force"]).unwrap()
    else {
        panic!()
    };
    assert!(args.to_request().unwrap().options.force);
}

#[test]
fn migrate_rejects_a_zero_downtime_before_sending() {
    let ClusterCommand::Migrate { args, .. } =
        parse(&["migrate", "vm", "--to", "hv1", "--downtime-ms", "0"]).unwrap()
    else {
        panic!()
    };
    match args.to_request() {
        Err(CliError::Local(body)) => assert_eq!(body.code, "invalid-migration-options"),
        other => panic!("expected an options error, got {other:?}"),
    }
}

#[test]
fn map_disk_values_are_disk_equals_datastore() {
    assert_eq!(
        parse_disk_mapping("disk0=local2"),
        Ok(("disk0".to_string(), "local2".to_string()))
    );
    for (bad, why) in [
        ("disk0", "has no '='"),
        ("=x", "names no disk"),
        ("disk0=", "names no datastore"),
        ("=", "names no disk"),
        ("", "has no '='"),
    ] {
        let err = parse_disk_mapping(bad).unwrap_err();
        assert!(err.contains(why), "{bad:?}: {err}");
        assert!(err.contains("e.g. disk0=local2"), "{bad:?}: {err}");
    }
    let pair = |d: &str, s: &str| (d.to_string(), s.to_string());
    assert_eq!(
        disk_map(&[pair("disk0", "local2"), pair("disk1", "fast")]).unwrap(),
        [pair("disk0", "local2"), pair("disk1", "fast")].into()
    );
    assert!(disk_map(&[]).unwrap().is_empty());
    // A disk named twice is refused, with the same datastore too.
    for second in ["fast", "local2"] {
        match disk_map(&[pair("disk0", "local2"), pair("disk0", second)]) {
            Err(CliError::Local(body)) => {
                assert_eq!(body.code, "invalid-migration-options");
                assert!(
                    body.message.contains("names disk disk0 twice"),
                    "{}",
                    body.message
                );
            }
            other => panic!("expected an options error, got {other:?}"),
        }
    }
}

#[test]
fn migrate_map_disk_flags_build_the_disk_map() {
    let ClusterCommand::Migrate { args, .. } = parse(&[
        "migrate",
        "vm",
        "--map-disk",
        "disk0=local2",
        "--map-disk=disk1=fast",
    ])
    .unwrap() else {
        panic!()
    };
    let req = args.to_request().unwrap();
    assert_eq!(
        serde_json::to_value(&req.options).unwrap()["disk_map"],
        serde_json::json!({"disk0": "local2", "disk1": "fast"})
    );
    // Without the flag the request is as before (no `disk_map` key).
    let ClusterCommand::Migrate { args, .. } = parse(&["migrate", "vm"]).unwrap() else {
        panic!()
    };
    let req = serde_json::to_value(args.to_request().unwrap()).unwrap();
    assert!(req["options"].get("disk_map").is_none(), "{req}");
    // Bad syntax is a usage error naming the flag; a repeated disk fails before sending.
    for bad in ["disk0", "=x", "disk0="] {
        let err = parse(&["migrate", "vm", "--map-disk", bad]).unwrap_err();
        assert!(err.contains("--map-disk <DISK=DATASTORE>"), "{err}");
    }
    let ClusterCommand::Migrate { args, .. } = parse(&[
        "migrate",
        "vm",
        "--map-disk",
        "disk0=a",
        "--map-disk",
        "disk0=b",
    ])
    .unwrap() else {
        panic!()
    };
    let err = args.to_request().unwrap_err();
    assert!(
        err.render().starts_with(
            "error[invalid-migration-options]: --map-disk names disk disk0 twice \
             (disk0=a and disk0=b)"
        ),
        "{}",
        err.render()
    );
}

#[test]
fn migration_list_filters() {
    let ClusterCommand::Migration { cmd, .. } = parse(&[
        "migration",
        "list",
        "--state",
        "failed",
        "--instance",
        "vm 1",
        "--host",
        "hv1",
    ])
    .unwrap() else {
        panic!()
    };
    let MigrationCommand::List {
        state,
        instance,
        host,
        limit,
    } = cmd
    else {
        panic!()
    };
    assert_eq!(state, Some(MigrationState::Failed));
    assert_eq!(
        list_query(state, instance.as_deref(), host.as_deref(), limit),
        "?state=failed&instance=vm%201&host=hv1"
    );
    assert_eq!(list_query(None, None, None, Some(5)), "?limit=5");
    assert_eq!(list_query(None, None, None, None), "");
    assert!(parse(&["migration", "list", "--state", "done"])
        .unwrap_err()
        .contains("is not a state"));
}

#[test]
fn migration_set_takes_new_pacing() {
    let ClusterCommand::Migration { cmd, .. } = parse(&[
        "migration",
        "set",
        "ab12cd34",
        "--bandwidth",
        "0",
        "--downtime-ms",
        "200",
    ])
    .unwrap() else {
        panic!()
    };
    let MigrationCommand::Set {
        id,
        bandwidth,
        downtime_ms,
    } = cmd
    else {
        panic!()
    };
    assert_eq!(
        (id.as_str(), bandwidth, downtime_ms),
        ("ab12cd34", Some(0), Some(200))
    );
    assert!(parse(&["migration", "set", "x", "--bandwidth", "-1"]).is_err());
}

#[test]
fn exit_codes_of_finished_migrations() {
    assert_eq!(exit_code_for(MigrationState::Completed), exit::OK);
    assert_eq!(
        exit_code_for(MigrationState::Failed),
        exit::MIGRATION_FAILED
    );
    assert_eq!(
        exit_code_for(MigrationState::Cancelled),
        exit::MIGRATION_CANCELLED
    );
}

#[test]
fn nic_values() {
    assert_eq!(
        parse_nic("lab").unwrap(),
        NicArg {
            network: "lab".into(),
            mac: None,
            ip: None,
            gw: None,
        }
    );
    let fixed = parse_nic("lab,ip=10.77.0.50/24,gw=10.77.0.2").unwrap();
    assert_eq!(fixed.ip.unwrap().to_string(), "10.77.0.50/24");
    assert_eq!(fixed.gw, Some(Ipv4Addr::new(10, 77, 0, 2)));
    for bad in [
        "lab,ip=10.77.0.50",
        "lab,ip=10.77.0.0/24",
        "lab,gw=10.77.0.2",
        "lab,ip=10.77.0.50/24,gw=10.78.0.1",
    ] {
        assert!(parse_nic(bad).is_err(), "{bad}");
    }
    assert_eq!(
        parse_nic("prod,mac=52:54:00:AA:bb:01")
            .unwrap()
            .mac
            .as_deref(),
        Some("52:54:00:aa:bb:01")
    );
    assert!(parse_nic("").is_err());
    assert!(parse_nic("lab,mac=52:54").is_err());
    assert!(parse_nic("lab,vlan=3").is_err());
    assert_eq!(
        parse_ip_prefix("10.77.0.100/24").unwrap(),
        (Ipv4Addr::new(10, 77, 0, 100), 24)
    );
    assert!(parse_ip_prefix("10.77.0.100").is_err());
    assert!(parse_ip_prefix("10.77.0.100/33").is_err());
}

#[test]
fn macs_are_stable_per_name_and_index() {
    assert_eq!(mac_for("vm1", 0), mac_for("vm1", 0));
    assert_ne!(mac_for("vm1", 0), mac_for("vm1", 1));
    assert_ne!(mac_for("vm1", 0), mac_for("vm2", 0));
    assert!(mac_for("vm1", 0).starts_with("52:54:00:"));
}

#[test]
fn create_with_explicit_kernel() {
    let ClusterCommand::Instance {
        cmd: InstanceCommand::Create(args),
        ..
    } = parse(&[
        "instance",
        "create",
        "web-1",
        "--memory-mib",
        "1024",
        "--vcpus",
        "2",
        "--kernel",
        "/srv/k",
        "--initrd",
        "/srv/i",
        "--cmdline",
        "console=ttyS0",
        "--nic",
        "prod,mac=52:54:00:00:00:09",
        "--nic",
        "backup",
        "--start",
    ])
    .unwrap()
    else {
        panic!()
    };
    let req = create_request(&args, None).unwrap();
    assert_eq!(
        serde_json::to_value(&req).unwrap(),
        serde_json::json!({
            "name": "web-1",
            "host": null,
            "disks": [],
            "spec": {
                "memory_mib": 1024,
                "vcpus": 2,
                "cpu_model": "qemu64",
                "machine": "pc",
                "boot": {"from": "kernel", "firmware": "bios", "kernel": "/srv/k",
                         "initrd": "/srv/i", "cmdline": "console=ttyS0"},
                "disks": [],
                "nics": [
                    {"network": "prod", "mac": "52:54:00:00:00:09"},
                    {"network": "backup", "mac": mac_for("web-1", 1)}
                ]
            },
            "start": true
        })
    );
}

fn create_args(args: &[&str]) -> ferry_cli::commands::instance::CreateArgs {
    let mut argv = vec!["instance", "create"];
    argv.extend_from_slice(args);
    match parse(&argv) {
        Ok(ClusterCommand::Instance {
            cmd: InstanceCommand::Create(args),
            ..
        }) => *args,
        other => panic!("not a create: {other:?}"),
    }
}

fn local_error(r: Result<ferry_api::instances::CreateInstance, CliError>) -> (String, String) {
    match r {
        Err(e @ CliError::Local(_)) => {
            assert_eq!(e.exit_code(), exit::ERROR);
            (e.body().code, e.body().message)
        }
        other => panic!("expected a usage error, got {other:?}"),
    }
}

#[test]
fn create_needs_a_kernel_or_the_lab_guest() {
    let args = create_args(&["x", "--memory-mib", "256"]);
    let (code, message) = local_error(create_request(&args, None));
    assert_eq!(code, "invalid-arguments");
    assert!(message.contains("--kernel"), "{message}");
    let args = create_args(&["x", "--memory-mib", "256", "--kernel", "/k"]);
    let (_, message) = local_error(create_request(&args, None));
    assert!(message.contains("--initrd"), "{message}");
    let err = parse(&["instance", "create", "x", "--lab-guest", "--kernel", "/k"]).unwrap_err();
    assert!(err.contains("cannot be used with"), "{err}");
    let ClusterCommand::Instance {
        cmd: InstanceCommand::Create(args),
        ..
    } = parse(&[
        "instance",
        "create",
        "x",
        "--memory-mib",
        "256",
        "--kernel",
        "/k",
        "--initrd",
        "/i",
        "--ip",
        "10.0.0.1/24",
    ])
    .unwrap()
    else {
        panic!()
    };
    let err = create_request(&args, None).unwrap_err();
    assert!(err.body().message.contains("--lab-guest"), "{err}");
}

#[test]
fn create_lab_guest_fills_boot_and_nic() {
    let ClusterCommand::Instance {
        cmd: InstanceCommand::Create(args),
        ..
    } = parse(&[
        "instance",
        "create",
        "vm1",
        "--lab-guest",
        "--ip",
        "10.77.0.100/24",
        "--host",
        "hv1",
    ])
    .unwrap()
    else {
        panic!()
    };
    let image = LabImage {
        kernel: "/cache/vmlinuz".into(),
        initrd: "/cache/initrd.cpio".into(),
    };
    let req = create_request(&args, Some(&image)).unwrap();
    assert_eq!(req.host.as_deref(), Some("hv1"));
    assert_eq!(req.spec.memory_mib, 256);
    assert_eq!(req.spec.boot.kernel.as_deref(), Some("/cache/vmlinuz"));
    assert_eq!(
        req.spec.boot.cmdline,
        "console=ttyS0 panic=-1 quiet ferry.ip=10.77.0.100/24 ferry.wss=64 ferry.rate=32 \
         ferry.fill=pattern ferry.hb_ms=10"
    );
    assert_eq!(req.spec.nics.len(), 1);
    assert_eq!(req.spec.nics[0].network, "lab");
    assert_eq!(req.spec.nics[0].mac, mac_for("vm1", 0));
    // The guest's working set must fit.
    let ClusterCommand::Instance {
        cmd: InstanceCommand::Create(small),
        ..
    } = parse(&[
        "instance",
        "create",
        "vm2",
        "--lab-guest",
        "--memory-mib",
        "128",
    ])
    .unwrap()
    else {
        panic!()
    };
    assert!(matches!(
        create_request(&small, Some(&image)),
        Err(CliError::Local(b)) if b.code == "invalid-instance"
    ));
}

#[test]
fn daemons_and_lab_parse() {
    assert!(matches!(
        parse(&["server", "--config", "/etc/ferry/server.toml"]).unwrap(),
        ClusterCommand::Server(a) if a.config.to_str() == Some("/etc/ferry/server.toml")
    ));
    assert!(parse(&["agent"]).unwrap_err().contains("--config"));
    assert_eq!(
        parse(&["lab", "up", "--hosts", "3", "--no-instance"]).unwrap(),
        ClusterCommand::Lab(ferry_cli::commands::lab::LabCommand::Up {
            name: "lab".into(),
            hosts: 3,
            no_instance: true
        })
    );
}

#[test]
fn path_segments_are_escaped() {
    assert_eq!(seg("vm-1_a.b"), "vm-1_a.b");
    assert_eq!(seg("../x y"), "..%2Fx%20y");
}

fn file(url: Option<&str>, token: Option<&str>) -> Result<FileConfig, CliError> {
    Ok(FileConfig {
        url: url.map(String::from),
        token: token.map(String::from),
        ..FileConfig::default()
    })
}

#[test]
fn config_resolution_order() {
    // Flags/env win and the file is not even read.
    let c = resolve(Some("http://a:1".into()), Some("t1".into()), || {
        panic!("file read although flags were complete")
    })
    .unwrap();
    assert_eq!(
        (c.url.as_str(), c.token.as_deref()),
        ("http://a:1", Some("t1"))
    );
    // Each field falls back on its own.
    let c = resolve(Some("http://a:1".into()), None, || {
        file(Some("http://b:2"), Some("t2"))
    })
    .unwrap();
    assert_eq!(
        (c.url.as_str(), c.token.as_deref()),
        ("http://a:1", Some("t2"))
    );
    // Empty values count as unset.
    let c = resolve(Some("".into()), Some("".into()), || {
        file(Some("http://b:2"), None)
    })
    .unwrap();
    assert_eq!((c.url.as_str(), c.token), ("http://b:2", None));
    // No URL anywhere, or a URL without scheme, is a usage error.
    let e = resolve(None, None, || file(None, None)).unwrap_err();
    assert_eq!(
        (e.body().code.as_str(), e.exit_code()),
        ("no-server-url", exit::ERROR)
    );
    let e = resolve(Some("127.0.0.1:7400".into()), None, || file(None, None)).unwrap_err();
    assert_eq!(e.body().code, "invalid-url");
}

#[test]
fn config_file_format() {
    let p = std::path::Path::new("cli.toml");
    assert_eq!(
        FileConfig::parse("url = \"http://h:7400\"\ntoken = \"abc\"\n", p).unwrap(),
        FileConfig {
            url: Some("http://h:7400".into()),
            token: Some("abc".into()),
            ..FileConfig::default()
        }
    );
    assert_eq!(FileConfig::parse("", p).unwrap(), FileConfig::default());
    let e = FileConfig::parse("url = 3", p).unwrap_err();
    assert_eq!(e.body().code, "config-invalid");
    assert!(e.body().message.contains("cli.toml"));
}

#[test]
fn lab_config_files_are_read_back_by_the_server_and_agents() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_config(
        "127.0.0.1:4000".parse().unwrap(),
        "/l/ferry.db".into(),
        &"a".repeat(32),
        &"j".repeat(32),
    );
    let path = dir.path().join("server.toml");
    std::fs::write(&path, to_toml(&server).unwrap()).unwrap();
    let parsed = ferry_server::ServerConfig::from_toml_file(&path).unwrap();
    assert_eq!(parsed.listen.port(), 4000);
    assert_eq!(parsed.admin_token, server.admin_token);

    let host = ferry_lab::net::LabHostNet {
        name: "hv1".into(),
        netns: "ferry-lab-hv1".into(),
        migration_addr: "10.78.0.11".parse().unwrap(),
        guest_bridge: "br0".into(),
    };
    let agent = agent_config(
        &host,
        "127.0.0.1:4001".parse().unwrap(),
        ferry_chaos::daemons::ServerRef {
            url: "https://127.0.0.1:4000",
            ca: std::path::Path::new("/l/pki/ca.pem"),
            join_token: &"j".repeat(32),
        },
        "/l/agents/hv1".into(),
        "tcg",
        vec![ferry_agent::DatastoreConfig {
            name: "images".into(),
            path: "/cache".into(),
            identity: None,
        }],
    );
    let text = to_toml(&agent).unwrap();
    let parsed = ferry_agent::AgentConfig::from_toml_str(&text, "agent.toml").unwrap();
    assert_eq!(parsed.netns.as_deref(), Some("ferry-lab-hv1"));
    assert_eq!(parsed.networks[0].bridge, "br0");
    assert_eq!(
        parsed.datastores[0].path,
        std::path::PathBuf::from("/cache")
    );
}

#[test]
fn the_deployment_examples_parse() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy");
    let server = ferry_server::ServerConfig::from_toml_file(&root.join("server.toml")).unwrap();
    assert_eq!(server.limits.cluster, 5);
    let agent = ferry_agent::AgentConfig::from_toml_file(&root.join("agent.toml")).unwrap();
    assert_eq!(agent.name, "hv1");
}

/// Tokens, credentials and the database must be root's only on real hosts too: the units
/// create every file 0600 and the state and configuration directories 0700, and the install
/// script installs the configuration that way.
#[test]
fn the_deployment_keeps_secrets_private() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy");
    for unit in ["ferry-server.service", "ferry-agent.service"] {
        let text = std::fs::read_to_string(root.join(unit)).unwrap();
        for line in [
            "UMask=0077",
            "StateDirectoryMode=0700",
            "ConfigurationDirectoryMode=0700",
        ] {
            assert!(text.lines().any(|l| l.trim() == line), "{unit}: {line}");
        }
    }
    let install = std::fs::read_to_string(root.join("install.sh")).unwrap();
    assert!(
        install.contains("install -d -m 0700 /etc/ferry"),
        "{install}"
    );
    assert!(install.contains("install -m 0600"), "{install}");
}

#[test]
fn check_tables_show_status_message_and_hint() {
    use ferry_api::checks::{Candidate, CheckResult, CheckStatus};
    use ferry_cli::commands::migrate::{candidates_table, checks_table};
    let check = |name: &str, status, overridable| CheckResult {
        name: name.into(),
        status,
        message: format!("{name} message"),
        hint: if status == CheckStatus::Pass {
            String::new()
        } else {
            format!("{name} hint")
        },
        values: serde_json::json!({}),
        overridable,
    };
    let unfit = Candidate {
        host: "hv2".into(),
        fit: false,
        rank: 2,
        free_ram_mib: 512,
        checks: vec![
            check("network", CheckStatus::Pass, false),
            check("memory", CheckStatus::Fail, true),
        ],
    };
    let table = checks_table(&unfit);
    assert!(table.starts_with("CHECK"), "{table}");
    assert!(
        table.contains("memory   FAIL (--force)  memory message   memory hint"),
        "{table}"
    );
    assert!(table.ends_with("hv2 does not fit"), "{table}");
    let fit = Candidate {
        host: "hv3".into(),
        fit: true,
        rank: 1,
        free_ram_mib: 4096,
        checks: vec![check("network", CheckStatus::Pass, false)],
    };
    let list = candidates_table(&[fit, unfit]);
    let lines: Vec<&str> = list.lines().collect();
    assert!(lines[1].starts_with("1     hv3   yes"), "{list}");
    assert!(lines[2].contains("memory: memory message"), "{list}");
}

#[test]
fn sizes_are_bytes_or_powers_of_1024() {
    use ferry_cli::commands::instance::parse_size;
    assert_eq!(parse_size("10G").unwrap(), 10 << 30);
    assert_eq!(parse_size("512M").unwrap(), 512 << 20);
    assert_eq!(parse_size("1T").unwrap(), 1 << 40);
    assert_eq!(parse_size("4k").unwrap(), 4096);
    assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
    assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
    for bad in [
        "",
        "G",
        "10X",
        "1.5G",
        "-1G",
        "1000",
        "0",
        "0G",
        "99999999999T",
    ] {
        assert!(parse_size(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn create_with_disks_builds_the_disk_requests() {
    let args = create_args(&[
        "db-1",
        "--memory-mib",
        "1024",
        "--disk",
        "10G@nfs,bus=sata,cache=writeback,serial=DATA-1,id=data",
        "--disk",
        "512M",
        "--disk-image",
        "/srv/ferry/images/debian.qcow2",
        "--disk-image",
        "/srv/ferry/images/tools.raw@local,ro,format=raw",
        "--disk-backing",
        "/mnt/nfs/golden.qcow2@nfs:20G",
        "--firmware",
        "uefi",
    ]);
    let req = create_request(&args, None).unwrap();
    assert_eq!(
        serde_json::to_value(&req.disks).unwrap(),
        serde_json::json!([
            {"id": null, "datastore": null, "size_bytes": null,
             "image": "/srv/ferry/images/debian.qcow2", "copy": false, "format": null,
             "backing": null, "bus": "virtio-blk", "cache": "none", "read_only": false,
             "serial": null},
            {"id": null, "datastore": "local", "size_bytes": null,
             "image": "/srv/ferry/images/tools.raw", "copy": false, "format": "raw",
             "backing": null, "bus": "virtio-blk", "cache": "none", "read_only": true,
             "serial": null},
            {"id": null, "datastore": "nfs", "size_bytes": 21474836480u64, "image": null,
             "copy": false, "format": null, "backing": "/mnt/nfs/golden.qcow2",
             "bus": "virtio-blk", "cache": "none", "read_only": false, "serial": null},
            {"id": "data", "datastore": "nfs", "size_bytes": 10737418240u64, "image": null,
             "copy": false, "format": null, "backing": null, "bus": "sata",
             "cache": "writeback", "read_only": false, "serial": "DATA-1"},
            {"id": null, "datastore": null, "size_bytes": 536870912, "image": null,
             "copy": false, "format": null, "backing": null, "bus": "virtio-blk",
             "cache": "none", "read_only": false, "serial": null}
        ])
    );
    // Without a kernel the first disk boots, through UEFI here.
    assert_eq!(req.spec.boot.from, ferry_api::instances::BootFrom::Disk);
    assert_eq!(
        req.spec.boot.firmware,
        ferry_api::instances::FirmwareKind::Uefi
    );
    assert_eq!(req.spec.boot.kernel, None);

    // --copy copies every image; an overlay without a size takes its base's.
    let args = create_args(&[
        "c",
        "--memory-mib",
        "256",
        "--disk-image",
        "/a/b@x.qcow2@local",
        "--disk-backing",
        "/mnt/nfs/base.qcow2",
        "--copy",
        "--boot",
        "disk",
    ]);
    let req = create_request(&args, None).unwrap();
    assert!(req.disks[0].copy);
    assert_eq!(req.disks[0].image.as_deref(), Some("/a/b@x.qcow2"));
    assert_eq!(req.disks[0].datastore.as_deref(), Some("local"));
    assert!(!req.disks[1].copy);
    assert_eq!(req.disks[1].size_bytes, None);
    assert_eq!(req.disks[1].backing.as_deref(), Some("/mnt/nfs/base.qcow2"));

    // A kernel boot keeps a data disk.
    let args = create_args(&[
        "k",
        "--memory-mib",
        "256",
        "--kernel",
        "/k",
        "--initrd",
        "/i",
        "--disk",
        "1G",
    ]);
    let req = create_request(&args, None).unwrap();
    assert_eq!(req.spec.boot.from, ferry_api::instances::BootFrom::Kernel);
    assert_eq!(req.disks.len(), 1);
}

#[test]
fn bad_disk_arguments_are_usage_errors() {
    let base = ["instance", "create", "x", "--memory-mib", "256"];
    let refused = |extra: &[&str], needle: &str| {
        let mut argv = base.to_vec();
        argv.extend_from_slice(extra);
        let err = parse(&argv).unwrap_err();
        assert!(err.contains(needle), "{extra:?}: {err}");
    };
    refused(&["--disk", "10X"], "is not a size");
    refused(&["--disk", "100"], "multiple of 512");
    refused(&["--disk", "10G@"], "both parts");
    refused(&["--disk", "10G,bus=usb"], "is not one of");
    refused(&["--disk", "10G,copy"], "is not a disk option");
    refused(&["--disk", ",ro"], "missing");
    refused(&["--disk-image", "images/a.qcow2"], "absolute path");
    refused(&["--disk-image", "/a.qcow2,format=vmdk"], "is not one of");
    refused(&["--disk-backing", "/b.qcow2:lots"], "is not a size");
    refused(&["--copy"], "--disk-image");
    refused(&["--boot", "cdrom"], "not disk or kernel");
    refused(&["--firmware", "coreboot"], "not bios or uefi");

    let args = create_args(&["x", "--memory-mib", "256", "--boot", "disk"]);
    let (_, message) = local_error(create_request(&args, None));
    assert!(message.contains("nothing to boot"), "{message}");
    let args = create_args(&[
        "x",
        "--memory-mib",
        "256",
        "--boot",
        "disk",
        "--disk",
        "1G",
        "--kernel",
        "/k",
    ]);
    let (_, message) = local_error(create_request(&args, None));
    assert!(message.contains("--boot is disk"), "{message}");
    let args = create_args(&["x", "--lab-guest", "--boot", "disk", "--disk", "1G"]);
    let image = LabImage {
        kernel: "/k".into(),
        initrd: "/i".into(),
    };
    let (_, message) = local_error(create_request(&args, Some(&image)));
    assert!(message.contains("--lab-guest"), "{message}");
}

#[test]
fn datastore_list_parses() {
    let ClusterCommand::Datastore { api, cmd } =
        parse(&["datastore", "list", "-o", "json"]).unwrap()
    else {
        panic!("not a datastore command")
    };
    assert_eq!(api.output, OutputFormat::Json);
    assert_eq!(cmd, ferry_cli::commands::datastore::DatastoreCommand::List);
}

#[test]
fn relative_kernel_and_initrd_paths_are_made_absolute_from_the_current_directory() {
    use ferry_cli::commands::instance::absolute_boot_file;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("boot")).unwrap();
    std::fs::write(dir.path().join("boot/vmlinuz"), b"k").unwrap();
    let base = dir.path().canonicalize().unwrap();
    assert_eq!(
        absolute_boot_file("--kernel", "boot/vmlinuz", dir.path()).unwrap(),
        format!("{}/boot/vmlinuz", base.display())
    );
    assert_eq!(
        absolute_boot_file("--kernel", "./boot/../boot/vmlinuz", dir.path()).unwrap(),
        format!("{}/boot/vmlinuz", base.display()),
        "`.` and `..` resolved"
    );
    assert_eq!(
        absolute_boot_file("--kernel", "/srv/k", dir.path()).unwrap(),
        "/srv/k",
        "an absolute path is the host's and stays as given"
    );
    let err = absolute_boot_file("--initrd", "initrd.img", dir.path()).unwrap_err();
    let body = err.body();
    assert_eq!(body.code, "invalid-arguments");
    assert!(body.message.contains("--initrd \"initrd.img\""), "{body}");
    assert!(body.message.contains("relative"), "{body}");
    assert!(
        body.hint.contains("absolute path") && body.hint.contains("current directory"),
        "the hint says what a relative path means: {body}"
    );
    let err = absolute_boot_file("--kernel", "boot", dir.path()).unwrap_err();
    assert_eq!(
        err.body().code,
        "invalid-arguments",
        "a directory is no kernel"
    );

    // Through create: cargo runs tests in the package's directory.
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .canonicalize()
        .unwrap();
    let args = create_args(&[
        "x",
        "--memory-mib",
        "256",
        "--kernel",
        "Cargo.toml",
        "--initrd",
        "src/main.rs",
    ]);
    let req = create_request(&args, None).unwrap();
    assert_eq!(
        req.spec.boot.kernel.as_deref(),
        Some(manifest.join("Cargo.toml").to_str().unwrap())
    );
    assert_eq!(
        req.spec.boot.initrd.as_deref(),
        Some(manifest.join("src/main.rs").to_str().unwrap())
    );
    let args = create_args(&[
        "x",
        "--memory-mib",
        "256",
        "--kernel",
        "no-such-kernel",
        "--initrd",
        "/i",
    ]);
    let (code, message) = local_error(create_request(&args, None));
    assert_eq!(code, "invalid-arguments");
    assert!(message.contains("no-such-kernel"), "{message}");
}

#[test]
fn lab_up_suggests_only_what_the_lab_can_do() {
    use ferry_cli::commands::lab::next_steps;
    let with_vm = next_steps("lab", 2, false);
    assert!(with_vm.contains("ferry migrate vm1 --to hv2"), "{with_vm}");
    let without = next_steps("t1", 2, true);
    assert!(!without.contains("migrate"), "no vm1 to migrate: {without}");
    assert!(
        without.contains("ferry instance create vm1 --lab-guest"),
        "{without}"
    );
    assert!(without.contains("ferry lab down --name t1"), "{without}");
    let one_host = next_steps("lab", 1, false);
    assert!(!one_host.contains("migrate"), "nowhere to go: {one_host}");
}

#[test]
fn instance_console_and_its_log_alias_parse() {
    for verb in ["console", "log"] {
        let cmd = parse(&["instance", verb, "vm1", "--bytes", "4096"]).unwrap();
        let ClusterCommand::Instance { cmd, .. } = cmd else {
            panic!("{cmd:?}")
        };
        assert_eq!(
            cmd,
            InstanceCommand::Console {
                instance: "vm1".into(),
                bytes: Some(4096)
            },
            "{verb}"
        );
    }
}
