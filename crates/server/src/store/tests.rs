use chrono::{Duration, Utc};
use ferry_api::hosts::{HostFacts, HostState};
use ferry_api::instances::{BootSpec, InstanceSpec, InstanceState};
use ferry_api::migrations::{MigrationKind, MigrationOptions, MigrationState, MigrationStats};
use ferry_api::ErrorBody;
use ferry_migrate::{Phase, Progress};
use uuid::Uuid;

use super::*;

fn facts(name: &str) -> HostFacts {
    HostFacts {
        name: name.into(),
        cpu_vendor: "GenuineIntel".into(),
        cpu_model: "test".into(),
        cpu_flags: vec!["sse2".into()],
        cores: 4,
        ram_total_mib: 8192,
        ram_free_mib: 4096,
        ram_reserve_mib: 0,
        accel: "tcg".into(),
        qemu_version: "8.2.0".into(),
        machine_types: vec!["pc".into()],
        firmware: vec!["bios".into()],
        datastores: vec![],
        networks: vec![],
        migration_addr: "127.0.0.1".into(),
        migration_ports: "49152-49215".into(),
        agent_version: "0.1.0".into(),
    }
}

fn spec() -> InstanceSpec {
    InstanceSpec {
        memory_mib: 256,
        vcpus: 1,
        cpu_model: "qemu64".into(),
        machine: "pc".into(),
        boot: BootSpec {
            kernel: Some("/k".into()),
            initrd: Some("/i".into()),
            cmdline: String::new(),
            ..BootSpec::default()
        },
        disks: vec![],
        nics: vec![],
    }
}

fn progress(percent: f64) -> Progress {
    Progress {
        phase: Phase::Precopy,
        elapsed_ms: 10,
        percent,
        transferred_bytes: 1,
        remaining_bytes: 2,
        total_bytes: 3,
        iteration: 1,
        throughput_bps: 1.5,
        dirty_rate_bps: 0.0,
        eta_ms: None,
        expected_downtime_ms: Some(5),
        total_time_ms: None,
        downtime_ms: None,
        cpu_throttle_percent: None,
        disks: Vec::new(),
        revision: None,
    }
}

/// A store with hosts `a` and `b` and instance `vm1` on `a`.
async fn fleet() -> (Store, Uuid) {
    let s = Store::open_memory().await.expect("open");
    s.join_host("a", "http://a:7001", "secret-a", &facts("a"))
        .await
        .expect("join a");
    s.join_host("b", "http://b:7001", "secret-b", &facts("b"))
        .await
        .expect("join b");
    let id = Uuid::new_v4();
    s.insert_instance(id, "vm1", "a", &spec(), InstanceState::Running)
        .await
        .expect("insert");
    (s, id)
}

fn new_migration(instance_id: Uuid) -> NewMigration {
    NewMigration {
        id: Uuid::new_v4(),
        instance_id,
        kind: MigrationKind::Live,
        source: "a".into(),
        destination: "b".into(),
        options: MigrationOptions {
            downtime_ms: Some(100),
            ..MigrationOptions::default()
        },
    }
}

#[test]
fn state_lists_match_the_api() {
    let all = MigrationState::ALL;
    let list = |pred: fn(MigrationState) -> bool| {
        let names: Vec<String> = all
            .iter()
            .filter(|s| pred(**s))
            .map(|s| format!("'{}'", s.as_str()))
            .collect();
        format!("({})", names.join(", "))
    };
    assert_eq!(list(MigrationState::is_terminal), TERMINAL_STATES_SQL);
    assert_eq!(list(MigrationState::is_active), ACTIVE_STATES_SQL);
    assert!(SCHEMA[0].1.contains(TERMINAL_STATES_SQL));
}

#[tokio::test]
async fn schema_applied_once_and_reopen_keeps_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nested/dir/ferry.db");
    let s = Store::open(&path).await.expect("open new");
    s.join_host("a", "http://a", "sa", &facts("a"))
        .await
        .expect("join");
    let first: Vec<(i64, i64)> =
        sqlx::query_as("SELECT version, applied_at FROM schema_migrations")
            .fetch_all(&s.pool)
            .await
            .expect("versions");
    assert_eq!(first.len(), SCHEMA.len());
    s.close().await;

    let s = Store::open(&path).await.expect("reopen");
    let again: Vec<(i64, i64)> =
        sqlx::query_as("SELECT version, applied_at FROM schema_migrations")
            .fetch_all(&s.pool)
            .await
            .expect("versions");
    assert_eq!(first, again, "re-opening must not re-apply the schema");
    let hosts = s
        .list_hosts(Duration::seconds(30), Utc::now())
        .await
        .expect("hosts");
    assert_eq!(hosts.len(), 1);
    s.close().await;
}

#[tokio::test]
async fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ferry.db");
    let s = Store::open(&path).await.expect("open");
    sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES (999, 0)")
        .execute(&s.pool)
        .await
        .expect("insert");
    s.close().await;
    let err = Store::open(&path).await.expect_err("must refuse");
    assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
}

#[tokio::test]
async fn open_failure_names_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A directory where the file should be: SQLite cannot open it.
    let path = dir.path().join("is-a-dir");
    std::fs::create_dir(&path).expect("mkdir");
    let err = Store::open(&path).await.expect_err("must fail");
    assert!(matches!(err, StoreError::Open { .. }));
    assert!(err.to_string().contains("is-a-dir"), "{err}");
    assert_eq!(err.code(), "database-unavailable");
}

/// Every byte of the database files in `dir` (main file, WAL, shared memory), as text.
fn database_bytes(dir: &std::path::Path) -> String {
    let mut bytes = Vec::new();
    for entry in std::fs::read_dir(dir).expect("ls") {
        // SQLite may still be removing its -wal/-shm files after close: a file that vanished
        // holds nothing any more.
        match std::fs::read(entry.expect("entry").path()) {
            Ok(b) => bytes.extend(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn valid(a: Authenticated) -> (String, Role) {
    match a {
        Authenticated::Valid { name, role, .. } => (name, role),
        other => panic!("not a valid token: {other:?}"),
    }
}

#[tokio::test]
async fn tokens_store_only_salted_hashes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ferry.db");
    let s = Store::open(&path).await.expect("open");
    let (admin, secret) = s
        .create_token("alice", Role::Admin, None)
        .await
        .expect("create");
    assert!(
        secret.starts_with(&format!("ferry_{}_", admin.id)),
        "{secret}"
    );
    let err = s
        .create_token("alice", Role::Reader, None)
        .await
        .expect_err("a second alice");
    assert_eq!(err.code(), "token-name-taken");
    let dash = s
        .insert_token_secret("dash", Role::Reader, "bootstrap-secret-value")
        .await
        .expect("insert");
    // Idempotent: same id, role updated from the config.
    let again = s
        .insert_token_secret("dash", Role::Admin, "bootstrap-secret-value")
        .await
        .expect("insert again");
    assert_eq!(again.id, dash.id);
    assert_eq!(again.role, Role::Admin);
    assert_eq!(s.list_tokens().await.expect("list").len(), 2);

    assert_eq!(
        valid(s.authenticate(&secret).await.expect("auth")),
        ("alice".into(), Role::Admin)
    );
    assert_eq!(
        valid(
            s.authenticate("bootstrap-secret-value")
                .await
                .expect("auth")
        ),
        ("dash".into(), Role::Admin)
    );
    for wrong in [
        "nope",
        "",
        &secret[..secret.len() - 1],
        &format!("{secret}0"),
    ] {
        assert_eq!(
            s.authenticate(wrong).await.expect("auth"),
            Authenticated::Unknown,
            "{wrong}"
        );
    }
    let listed = s.list_tokens().await.expect("list");
    assert!(
        listed.iter().all(|t| t.last_used_at.is_some()),
        "{listed:?}"
    );

    // A changed configured secret replaces the old one at once.
    s.insert_token_secret("dash", Role::Admin, "another-secret-value")
        .await
        .expect("change");
    assert_eq!(
        s.authenticate("bootstrap-secret-value")
            .await
            .expect("auth"),
        Authenticated::Unknown
    );
    assert!(s.revoke_token(&admin.id).await.expect("revoke"));
    assert_eq!(
        s.authenticate(&secret).await.expect("auth"),
        Authenticated::Unknown,
        "refused at once, though verified a moment ago"
    );
    s.close().await;

    let haystack = database_bytes(dir.path());
    for secret in [&secret, "bootstrap-secret-value", "another-secret-value"] {
        assert!(!haystack.contains(secret), "{secret} is in the file");
        assert!(
            !haystack.contains(&sha256_hex(secret)),
            "the unsalted SHA-256 of {secret} is in the file"
        );
    }
    assert!(haystack.contains("$argon2id$"));
}

#[tokio::test]
async fn an_expired_token_is_refused_even_from_the_cache() {
    let s = Store::open_memory().await.expect("open");
    let soon = Utc::now() + Duration::milliseconds(600);
    let (_, secret) = s
        .create_token("short", Role::Operator, Some(soon))
        .await
        .expect("create");
    assert_eq!(
        valid(s.authenticate(&secret).await.expect("auth")),
        ("short".into(), Role::Operator)
    );
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    match s.authenticate(&secret).await.expect("auth") {
        Authenticated::Expired { name, at } => {
            assert_eq!(name, "short");
            assert!(at <= Utc::now());
        }
        other => panic!("{other:?}"),
    }
    let (_, old) = s
        .create_token("old", Role::Reader, Some(Utc::now() - Duration::hours(1)))
        .await
        .expect("create");
    assert!(matches!(
        s.authenticate(&old).await.expect("auth"),
        Authenticated::Expired { .. }
    ));
}

#[tokio::test]
async fn revoking_by_name_is_immediate_and_spares_the_configured_token() {
    let s = Store::open_memory().await.expect("open");
    let (_, secret) = s
        .create_token("ci", Role::Operator, None)
        .await
        .expect("create");
    s.insert_token_secret("admin", Role::Admin, "configured")
        .await
        .expect("config");
    valid(s.authenticate(&secret).await.expect("auth"));
    let gone = s.revoke_tokens_named("ci").await.expect("revoke");
    assert_eq!(gone.len(), 1);
    assert_eq!(
        s.authenticate(&secret).await.expect("auth"),
        Authenticated::Unknown
    );
    assert!(s
        .revoke_tokens_named("admin")
        .await
        .expect("revoke")
        .is_empty());
    valid(s.authenticate("configured").await.expect("auth"));
    // The name is free again.
    s.create_token("ci", Role::Reader, None)
        .await
        .expect("create again");
}

/// A database written by schema version 8 (unsalted SHA-256 for tokens and agent
/// credentials, the role read_only) opens with its tokens and agents still working; each
/// secret is re-hashed with argon2 at its first use and its SHA-256 leaves the file.
#[tokio::test]
async fn tokens_and_agents_of_an_older_schema_keep_working_and_are_rehashed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ferry.db");
    {
        let options = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .expect("pool");
        sqlx::query("CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)")
            .execute(&pool)
            .await
            .expect("create");
        for (version, sql) in SCHEMA.iter().filter(|(v, _)| *v <= 8) {
            sqlx::raw_sql(sql).execute(&pool).await.expect("schema");
            sqlx::query("INSERT INTO schema_migrations VALUES ($1, 0)")
                .bind(version)
                .execute(&pool)
                .await
                .expect("version");
        }
        for (id, name, role, secret) in [
            ("t1", "old-admin", "admin", "old-admin-secret"),
            ("t2", "old-viewer", "read_only", "old-viewer-secret"),
        ] {
            sqlx::query("INSERT INTO api_tokens VALUES ($1, $2, $3, $4, 0)")
                .bind(id)
                .bind(name)
                .bind(role)
                .bind(sha256_hex(secret))
                .execute(&pool)
                .await
                .expect("token");
        }
        sqlx::query(
            "INSERT INTO hosts (name, agent_url, agent_secret, agent_secret_sha256, enabled, joined_at)
             VALUES ('hv1', 'http://hv1', 'x', $1, TRUE, 0)",
        )
        .bind(sha256_hex("old-agent-credential"))
        .execute(&pool)
        .await
        .expect("host");
        pool.close().await;
    }
    let s = Store::open(&path).await.expect("open");
    assert_eq!(
        valid(s.authenticate("old-viewer-secret").await.expect("auth")),
        ("old-viewer".into(), Role::Reader)
    );
    assert_eq!(
        valid(s.authenticate("old-admin-secret").await.expect("auth")),
        ("old-admin".into(), Role::Admin)
    );
    assert_eq!(
        s.authenticate("old-admin-secreT").await.expect("auth"),
        Authenticated::Unknown
    );
    assert_eq!(
        s.host_for_agent_secret("old-agent-credential")
            .await
            .expect("agent"),
        Some("hv1".into())
    );
    s.close().await;
    // Re-hashed: a fresh store (no cache) still accepts them, and no full SHA-256 is left.
    let s = Store::open(&path).await.expect("reopen");
    valid(s.authenticate("old-viewer-secret").await.expect("auth"));
    assert_eq!(
        s.host_for_agent_secret("old-agent-credential")
            .await
            .expect("agent"),
        Some("hv1".into())
    );
    s.close().await;
    let haystack = database_bytes(dir.path());
    // The WAL may keep old page images until a checkpoint; after close SQLite checkpointed.
    for secret in [
        "old-admin-secret",
        "old-viewer-secret",
        "old-agent-credential",
    ] {
        assert!(
            !haystack.contains(&sha256_hex(secret)),
            "the SHA-256 of {secret} is still in the file"
        );
    }
}

#[test]
fn roles_parse_and_order() {
    assert_eq!("admin".parse::<Role>(), Ok(Role::Admin));
    assert_eq!("operator".parse::<Role>(), Ok(Role::Operator));
    assert_eq!("reader".parse::<Role>(), Ok(Role::Reader));
    assert_eq!("read_only".parse::<Role>(), Ok(Role::Reader));
    assert_eq!(Role::Reader.as_str(), "reader");
    assert!("root".parse::<Role>().is_err());
    assert!(Role::Admin.allows(Role::Operator));
    assert!(Role::Operator.allows(Role::Reader));
    assert!(!Role::Operator.allows(Role::Admin));
    assert!(!Role::Reader.allows(Role::Operator));
}

#[tokio::test]
async fn agent_certificates_are_recorded_and_replaced_ones_revoked() {
    let s = Store::open_memory().await.expect("open");
    let later = Utc::now() + chrono::Duration::days(90);
    assert!(s
        .record_agent_cert("a", "01aa", later)
        .await
        .expect("first")
        .is_empty());
    assert!(s.revoked_agent_serials().await.expect("q").is_empty());
    let revoked = s
        .record_agent_cert("a", "01bb", later)
        .await
        .expect("second");
    assert_eq!(revoked, vec!["01aa".to_string()]);
    assert!(s
        .record_agent_cert("b", "01cc", later)
        .await
        .expect("b")
        .is_empty());
    assert_eq!(
        s.revoked_agent_serials().await.expect("q"),
        vec!["01aa".to_string()]
    );
}

#[tokio::test]
async fn hosts_join_heartbeat_online_offline() {
    let s = Store::open_memory().await.expect("open");
    s.join_host("a", "http://a:1", "s1", &facts("a"))
        .await
        .expect("join");
    assert_eq!(
        s.host_for_agent_secret("s1").await.expect("q"),
        Some("a".into())
    );
    assert_eq!(
        s.agent_url("a").await.expect("q").as_deref(),
        Some("http://a:1")
    );
    // Re-join after state loss: new secret and URL replace the old ones; enabled kept.
    assert!(s.set_host_enabled("a", false).await.expect("disable"));
    s.join_host("a", "http://a:2", "s2", &facts("a"))
        .await
        .expect("rejoin");
    assert_eq!(s.host_for_agent_secret("s1").await.expect("q"), None);
    assert_eq!(
        s.host_for_agent_secret("s2").await.expect("q"),
        Some("a".into())
    );
    assert_eq!(
        s.agent_url("a").await.expect("q").as_deref(),
        Some("http://a:2")
    );
    // Another host cannot take the same secret.
    let err = s
        .join_host("b", "http://b", "s2", &facts("b"))
        .await
        .expect_err("dup secret");
    assert!(matches!(err, StoreError::Conflict { .. }));

    let t0 = Utc::now();
    let mut f = facts("a");
    f.ram_free_mib = 1;
    s.record_heartbeat("a", &f, t0).await.expect("hb");
    let timeout = Duration::seconds(15);
    let h = s
        .get_host("a", timeout, t0 + Duration::seconds(10))
        .await
        .expect("get")
        .expect("a");
    assert_eq!(h.state, HostState::Online);
    assert!(!h.enabled);
    assert_eq!(h.facts.as_ref().map(|f| f.ram_free_mib), Some(1));
    assert_eq!(
        h.last_heartbeat.map(|t| t.timestamp_millis()),
        Some(t0.timestamp_millis())
    );
    let h = s
        .get_host("a", timeout, t0 + Duration::seconds(16))
        .await
        .expect("get")
        .expect("a");
    assert_eq!(h.state, HostState::Offline);
    assert!(s.get_host("zz", timeout, t0).await.expect("get").is_none());
    assert!(!s.set_host_enabled("zz", true).await.expect("enable"));
    assert!(matches!(
        s.record_heartbeat("zz", &f, t0).await,
        Err(StoreError::NotFound(_))
    ));

    s.insert_instance(Uuid::new_v4(), "vm", "a", &spec(), InstanceState::Stopped)
        .await
        .expect("insert");
    let hosts = s.list_hosts(timeout, t0).await.expect("list");
    assert_eq!(hosts.len(), 1);
    assert_eq!(hosts[0].instances, 1);
}

#[tokio::test]
async fn instances_insert_get_conflict() {
    let (s, id) = fleet().await;
    let by_id = s
        .get_instance(&id.to_string())
        .await
        .expect("get")
        .expect("by id");
    let by_upper = s
        .get_instance(&id.to_string().to_uppercase())
        .await
        .expect("get")
        .expect("by upper id");
    let by_name = s.get_instance("vm1").await.expect("get").expect("by name");
    assert_eq!(by_id, by_name);
    assert_eq!(by_id, by_upper);
    assert_eq!(by_id.host, "a");
    assert_eq!(by_id.generation, 0);
    assert_eq!(by_id.spec, spec());
    assert_eq!(by_id.migration, None);
    assert!(s.get_instance("nope").await.expect("get").is_none());

    let err = s
        .insert_instance(Uuid::new_v4(), "vm1", "b", &spec(), InstanceState::Stopped)
        .await
        .expect_err("duplicate name");
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    assert_eq!(err.code(), "instance-exists");
    let err = s
        .insert_instance(
            Uuid::new_v4(),
            "vm2",
            "nohost",
            &spec(),
            InstanceState::Stopped,
        )
        .await
        .expect_err("unknown host");
    assert!(matches!(err, StoreError::NotFound(_)), "{err}");

    s.set_instance_state(id, InstanceState::Stopped)
        .await
        .expect("state");
    assert_eq!(
        s.get_instance("vm1")
            .await
            .expect("get")
            .expect("vm1")
            .state,
        InstanceState::Stopped
    );
    s.insert_instance(Uuid::new_v4(), "vm0", "b", &spec(), InstanceState::Stopped)
        .await
        .expect("insert");
    let all = s.list_instances(None).await.expect("list");
    assert_eq!(
        all.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
        ["vm0", "vm1"]
    );
    assert_eq!(s.list_instances(Some("b")).await.expect("list").len(), 1);

    s.delete_instance(id).await.expect("delete");
    assert!(s.get_instance("vm1").await.expect("get").is_none());
    assert!(matches!(
        s.delete_instance(id).await,
        Err(StoreError::NotFound(_))
    ));
}

#[tokio::test]
async fn migration_insert_and_single_open_job() {
    let (s, id) = fleet().await;
    let new = new_migration(id);
    let m = s.insert_migration(&new).await.expect("insert");
    assert_eq!(m.state, MigrationState::Pending);
    assert_eq!(m.instance_name, "vm1");
    assert_eq!(m.options, new.options);
    assert!(!m.cancel_requested);
    assert_eq!(s.get_migration(m.id).await.expect("get"), Some(m.clone()));
    assert_eq!(
        s.get_instance("vm1")
            .await
            .expect("get")
            .expect("vm1")
            .migration,
        Some(m.id)
    );

    let err = s
        .insert_migration(&new_migration(id))
        .await
        .expect_err("second open job");
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    // Deleting an instance with a job in flight is refused.
    assert!(matches!(
        s.delete_instance(id).await,
        Err(StoreError::Conflict { .. })
    ));
    let err = s
        .insert_migration(&new_migration(Uuid::new_v4()))
        .await
        .expect_err("unknown instance");
    assert!(matches!(err, StoreError::NotFound(_)), "{err}");
    let mut bad_host = new_migration(id);
    bad_host.destination = "nowhere".into();
    s.set_migration_state(m.id, MigrationState::Failed, None)
        .await
        .expect("fail");
    let err = s
        .insert_migration(&bad_host)
        .await
        .expect_err("unknown host");
    assert!(matches!(err, StoreError::NotFound(_)), "{err}");

    // Once the first has ended, a new one is allowed.
    let m2 = s
        .insert_migration(&new_migration(id))
        .await
        .expect("second");
    assert_eq!(
        s.get_instance("vm1")
            .await
            .expect("get")
            .expect("vm1")
            .migration,
        Some(m2.id)
    );
}

#[tokio::test]
async fn pending_is_fifo_and_listing_is_newest_first() {
    let (s, id) = fleet().await;
    let mut ids = vec![];
    let mut instances = vec![id];
    for n in 2..=4 {
        let iid = Uuid::new_v4();
        s.insert_instance(iid, &format!("vm{n}"), "a", &spec(), InstanceState::Running)
            .await
            .expect("insert");
        instances.push(iid);
    }
    for iid in &instances {
        ids.push(
            s.insert_migration(&new_migration(*iid))
                .await
                .expect("insert")
                .id,
        );
    }
    let pending: Vec<Uuid> = s
        .pending_in_order()
        .await
        .expect("pending")
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(pending, ids);

    s.set_migration_state(ids[1], MigrationState::Preparing, None)
        .await
        .expect("prep");
    let listed: Vec<Uuid> = s
        .list_migrations(&MigrationFilter::default())
        .await
        .expect("list")
        .iter()
        .map(|m| m.id)
        .collect();
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(listed, newest_first);

    let active = s
        .list_migrations(&MigrationFilter {
            active_only: true,
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(active.len(), 1);
    assert_eq!(active[0].id, ids[1]);
    let pending_state = s
        .list_migrations(&MigrationFilter {
            state: Some(MigrationState::Pending),
            host: Some("b".into()),
            limit: Some(2),
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(
        pending_state.iter().map(|m| m.id).collect::<Vec<_>>(),
        [ids[3], ids[2]]
    );
    let for_instance = s
        .list_migrations(&MigrationFilter {
            instance: Some(instances[0]),
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(for_instance.len(), 1);
    let none = s
        .list_migrations(&MigrationFilter {
            host: Some("c".into()),
            ..Default::default()
        })
        .await
        .expect("list");
    assert!(none.is_empty());
    assert_eq!(
        s.pending_in_order()
            .await
            .expect("pending")
            .iter()
            .map(|m| m.id)
            .collect::<Vec<_>>(),
        [ids[0], ids[2], ids[3]]
    );
}

#[tokio::test]
async fn state_timestamps_and_terminal_states() {
    let (s, id) = fleet().await;
    let m = s
        .insert_migration(&new_migration(id))
        .await
        .expect("insert");
    assert!(m.preparing_at.is_none() && m.finished_at.is_none());
    let m = s
        .set_migration_state(m.id, MigrationState::Preparing, None)
        .await
        .expect("prep");
    assert_eq!(m.state, MigrationState::Preparing);
    let preparing_at = m.preparing_at.expect("preparing_at");
    let m = s
        .set_migration_state(m.id, MigrationState::Migrating, None)
        .await
        .expect("mig");
    assert!(m.migrating_at.is_some());
    assert_eq!(m.preparing_at, Some(preparing_at));
    let m = s
        .set_migration_state(m.id, MigrationState::Completing, None)
        .await
        .expect("completing");
    assert!(m.completing_at.is_some());
    assert!(m.finished_at.is_none());
    let m = s.set_cancel_requested(m.id).await.expect("cancel req");
    assert!(m.cancel_requested);

    let error = ErrorBody::new("qemu-failed", "it broke", "look at the log");
    let m = s
        .set_migration_state(m.id, MigrationState::Failed, Some(&error))
        .await
        .expect("fail");
    assert_eq!(m.state, MigrationState::Failed);
    assert!(m.finished_at.is_some());
    assert_eq!(m.error, Some(error.clone()));

    // Terminal: nothing moves it any more.
    for to in [
        MigrationState::Pending,
        MigrationState::Migrating,
        MigrationState::Completed,
        MigrationState::Cancelled,
    ] {
        let err = s
            .set_migration_state(m.id, to, None)
            .await
            .expect_err("terminal");
        assert!(
            matches!(err, StoreError::InvalidTransition { from: MigrationState::Failed, to: t } if t == to),
            "{err}"
        );
    }
    // Re-setting the same terminal state is a harmless no-op.
    let same = s
        .set_migration_state(m.id, MigrationState::Failed, None)
        .await
        .expect("same");
    assert_eq!(same, m);
    assert!(matches!(
        s.complete_migration(m.id, None).await,
        Err(StoreError::InvalidTransition { .. })
    ));
    assert!(matches!(
        s.set_cancel_requested(m.id).await,
        Err(StoreError::InvalidTransition { .. })
    ));
    assert!(matches!(
        s.move_instance_for(m.id).await,
        Err(StoreError::Conflict { .. })
    ));
    assert!(matches!(
        s.set_migration_state(Uuid::new_v4(), MigrationState::Failed, None)
            .await,
        Err(StoreError::NotFound(_))
    ));
    // The instance did not move.
    let vm = s.get_instance("vm1").await.expect("get").expect("vm1");
    assert_eq!(
        (vm.host.as_str(), vm.generation, vm.migration),
        ("a", 0, None)
    );
}

#[tokio::test]
async fn complete_migration_moves_instance_atomically() {
    let (s, id) = fleet().await;
    let m = s
        .insert_migration(&new_migration(id))
        .await
        .expect("insert");
    s.set_migration_state(m.id, MigrationState::Migrating, None)
        .await
        .expect("mig");
    let stats = MigrationStats {
        total_ms: 1000,
        qemu_pause_ms: 20,
        bytes_transferred: 1 << 30,
        iterations: 3,
    };
    let done = s
        .complete_migration(m.id, Some(&stats))
        .await
        .expect("complete");
    assert_eq!(done.state, MigrationState::Completed);
    assert!(done.finished_at.is_some());
    assert_eq!(done.stats, Some(stats));
    let vm = s.get_instance("vm1").await.expect("get").expect("vm1");
    assert_eq!(
        (vm.host.as_str(), vm.generation, vm.migration),
        ("b", 1, None)
    );
    assert_eq!(done.instance_name, "vm1");

    // Completing twice changes nothing.
    let again = s.complete_migration(m.id, None).await.expect("again");
    assert_eq!(again, done);
    let vm = s.get_instance("vm1").await.expect("get").expect("vm1");
    assert_eq!(vm.generation, 1);
    assert!(matches!(
        s.complete_migration(Uuid::new_v4(), None).await,
        Err(StoreError::NotFound(_))
    ));
}

#[tokio::test]
async fn complete_migration_rolls_back_when_the_move_fails() {
    let (s, id) = fleet().await;
    let m = s
        .insert_migration(&new_migration(id))
        .await
        .expect("insert");
    // Make the instance update fail inside the transaction.
    sqlx::query(
        "CREATE TRIGGER no_moves BEFORE UPDATE OF host ON instances
         BEGIN SELECT RAISE(ABORT, 'blocked'); END",
    )
    .execute(&s.pool)
    .await
    .expect("trigger");
    assert!(s.complete_migration(m.id, None).await.is_err());
    let m = s.get_migration(m.id).await.expect("get").expect("m");
    assert_eq!(
        m.state,
        MigrationState::Pending,
        "job must not complete alone"
    );
}

#[tokio::test]
async fn move_instance_for_is_idempotent() {
    let (s, id) = fleet().await;
    let m = s
        .insert_migration(&new_migration(id))
        .await
        .expect("insert");
    s.set_migration_state(m.id, MigrationState::Completing, None)
        .await
        .expect("completing");
    s.move_instance_for(m.id).await.expect("move");
    s.move_instance_for(m.id).await.expect("move again");
    let vm = s.get_instance("vm1").await.expect("get").expect("vm1");
    assert_eq!(
        (vm.host.as_str(), vm.generation, vm.migration),
        ("b", 1, Some(m.id))
    );
    let m = s.get_migration(m.id).await.expect("get").expect("m");
    assert_eq!(m.state, MigrationState::Completing);
    // Then completing does not move it a second time.
    s.complete_migration(m.id, None).await.expect("complete");
    let vm = s.get_instance("vm1").await.expect("get").expect("vm1");
    assert_eq!(
        (vm.host.as_str(), vm.generation, vm.migration),
        ("b", 1, None)
    );
    assert!(matches!(
        s.move_instance_for(Uuid::new_v4()).await,
        Err(StoreError::NotFound(_))
    ));
}

#[tokio::test]
async fn progress_samples_and_logs() {
    let (s, id) = fleet().await;
    let m = s
        .insert_migration(&new_migration(id))
        .await
        .expect("insert");
    s.set_progress(m.id, &progress(50.0))
        .await
        .expect("progress");
    let mut odd = progress(f64::NAN);
    odd.throughput_bps = f64::INFINITY;
    s.set_progress(m.id, &odd).await.expect("progress nan");
    let got = s.get_migration(m.id).await.expect("get").expect("m");
    assert_eq!(got.progress.map(|p| p.percent), Some(0.0));

    s.add_sample(m.id, &progress(10.0)).await.expect("sample");
    s.add_sample(m.id, &progress(20.0)).await.expect("sample");
    let samples = s.samples(m.id).await.expect("samples");
    assert_eq!(
        samples.iter().map(|p| p.percent).collect::<Vec<_>>(),
        [10.0, 20.0]
    );
    s.add_sample(m.id, &progress(30.0)).await.expect("sample");
    let page = s.samples_page(m.id, 1, 1).await.expect("page");
    assert_eq!(
        page.iter()
            .map(|x| (x.seq, x.progress.percent))
            .collect::<Vec<_>>(),
        [(2, 20.0)],
        "after seq 1, one sample"
    );
    let rest = s.samples_page(m.id, 2, 10).await.expect("page");
    assert_eq!(rest.iter().map(|x| x.seq).collect::<Vec<_>>(), [3]);
    assert!(s.samples_page(m.id, 3, 10).await.expect("page").is_empty());
    assert!(matches!(
        s.add_sample(Uuid::new_v4(), &progress(1.0)).await,
        Err(StoreError::NotFound(_))
    ));

    for n in 0..5 {
        s.add_log(m.id, "info", &format!("line {n}"))
            .await
            .expect("log");
    }
    let other = {
        s.set_migration_state(m.id, MigrationState::Cancelled, None)
            .await
            .expect("cancel");
        s.insert_migration(&new_migration(id))
            .await
            .expect("insert")
    };
    s.add_log(other.id, "warn", "other job").await.expect("log");
    let logs = s.logs(m.id).await.expect("logs");
    assert_eq!(
        logs.iter().map(|l| l.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(logs[4].message, "line 4");
    assert_eq!(logs[0].level, "info");
    let other_logs = s.logs(other.id).await.expect("logs");
    assert_eq!(other_logs.len(), 1);
    assert_eq!(other_logs[0].seq, 1);
    assert!(matches!(
        s.add_log(Uuid::new_v4(), "info", "x").await,
        Err(StoreError::NotFound(_))
    ));

    let stats = MigrationStats {
        total_ms: 1,
        qemu_pause_ms: 1,
        bytes_transferred: 1,
        iterations: 1,
    };
    s.set_stats(m.id, &stats).await.expect("stats");
    assert_eq!(
        s.get_migration(m.id).await.expect("get").expect("m").stats,
        Some(stats)
    );
}

#[tokio::test]
async fn migration_history_outlives_the_instance() {
    let (s, id) = fleet().await;
    let m = s
        .insert_migration(&new_migration(id))
        .await
        .expect("insert");
    s.complete_migration(m.id, None).await.expect("complete");
    s.delete_instance(id).await.expect("delete");
    let m = s.get_migration(m.id).await.expect("get").expect("m");
    assert_eq!(m.instance_name, "vm1");
}

#[tokio::test]
async fn audit_newest_first() {
    let s = Store::open_memory().await.expect("open");
    for n in 0..3 {
        s.audit(
            "alice",
            "instance.create",
            &format!("vm{n}"),
            &serde_json::json!({ "n": n }),
        )
        .await
        .expect("audit");
    }
    let entries = s.list_audit(2).await.expect("list");
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0].target, "vm2");
    assert_eq!(entries[0].detail, serde_json::json!({ "n": 2 }));
    assert_eq!(entries[1].target, "vm1");
    assert_eq!(entries[0].actor, "alice");
    assert_eq!(entries[0].action, "instance.create");
}

#[tokio::test]
async fn corrupt_rows_are_errors_not_panics() {
    let (s, id) = fleet().await;
    let m = s
        .insert_migration(&new_migration(id))
        .await
        .expect("insert");
    sqlx::query("UPDATE instances SET spec = $1")
        .bind("{not json")
        .execute(&s.pool)
        .await
        .expect("corrupt");
    let err = s.get_instance("vm1").await.expect_err("corrupt spec");
    assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
    assert_eq!(err.code(), "database-corrupt");
    assert!(matches!(
        s.list_instances(None).await,
        Err(StoreError::Corrupt(_))
    ));

    sqlx::query("UPDATE migrations SET options = $1, state = $2")
        .bind("42")
        .bind("pending")
        .execute(&s.pool)
        .await
        .expect("corrupt");
    assert!(matches!(
        s.get_migration(m.id).await,
        Err(StoreError::Corrupt(_))
    ));
    sqlx::query("UPDATE migrations SET options = $1, state = $2")
        .bind("{}")
        .bind("teleporting")
        .execute(&s.pool)
        .await
        .expect("corrupt");
    assert!(matches!(
        s.get_migration(m.id).await,
        Err(StoreError::Corrupt(_))
    ));
    sqlx::query("UPDATE hosts SET facts = $1, last_heartbeat = $2")
        .bind("nope")
        .bind("not a number")
        .execute(&s.pool)
        .await
        .expect("corrupt");
    assert!(matches!(
        s.list_hosts(Duration::seconds(1), Utc::now()).await,
        Err(StoreError::Corrupt(_))
    ));
}

/// The store's own conflict checks (which catch the races the API's checks cannot) answer
/// with the code the API gives for the same situation: one situation, one code.
#[tokio::test]
async fn store_conflicts_carry_the_api_codes() {
    let (s, id) = fleet().await;
    let err = s
        .insert_instance(Uuid::new_v4(), "vm1", "b", &spec(), InstanceState::Stopped)
        .await
        .expect_err("duplicate name");
    let api = crate::ServerError::from(err);
    assert_eq!(
        (api.status, api.body.code.as_str()),
        (409, "instance-exists")
    );

    s.insert_migration(&new_migration(id)).await.expect("first");
    let err = s
        .insert_migration(&new_migration(id))
        .await
        .expect_err("second open job");
    let api = crate::ServerError::from(err);
    assert_eq!(
        (api.status, api.body.code.as_str()),
        (409, "migration-in-progress"),
        "{api}"
    );
    assert!(api.body.hint.contains("cancel"), "{api}");
    let err = s.delete_instance(id).await.expect_err("job in flight");
    let api = crate::ServerError::from(err);
    assert_eq!(
        (api.status, api.body.code.as_str()),
        (409, "migration-in-progress"),
        "{api}"
    );
    assert_eq!(codes::MIGRATION_IN_PROGRESS, "migration-in-progress");
}

/// The database holds agent credentials: it and its WAL and SHM files are the owner's only,
/// and so is a directory the store had to create for it.
#[tokio::test]
async fn database_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| {
        std::fs::metadata(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o777
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("state").join("ferry.db");
    let s = Store::open(&db).await.expect("open");
    s.join_host("a", "http://a:7001", "secret-a", &facts("a"))
        .await
        .expect("join");
    assert_eq!(mode(&dir.path().join("state")), 0o700);
    for name in ["ferry.db", "ferry.db-wal", "ferry.db-shm"] {
        assert_eq!(mode(&dir.path().join("state").join(name)), 0o600, "{name}");
    }
    s.close().await;

    // A file an older version left readable by all is made private on the next open.
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let s = Store::open(&db).await.expect("reopen");
    assert_eq!(mode(&db), 0o600);
    s.close().await;
}

#[tokio::test]
async fn disk_copies_are_recorded_and_cleanup_is_due_once() {
    use ferry_api::instances::{DiskFormat, ImageRef};
    use ferry_api::migrations::{DiskCopy, DiskCopyState};
    let (s, id) = fleet().await;
    let m = s
        .insert_migration(&new_migration(id))
        .await
        .expect("insert");
    assert!(m.copies.is_empty() && m.cleaned_up_at.is_none());
    let copy = DiskCopy {
        disk: "disk0".into(),
        image: ImageRef {
            datastore: "local".into(),
            file: "vm1-disk0.qcow2".into(),
        },
        target: None,
        format: DiskFormat::Qcow2,
        size_bytes: 1 << 30,
        state: DiskCopyState::Copied,
        done_bytes: 1 << 30,
        remaining_bytes: 0,
        rate_bps: f64::INFINITY,
        elapsed_ms: 1200,
        sha256: Some("ab".repeat(32)),
        source_kept: true,
        target_kept: false,
        bitmap: None,
    };
    s.set_copies(m.id, std::slice::from_ref(&copy))
        .await
        .expect("copies");
    let got = s.get_migration(m.id).await.unwrap().unwrap();
    assert_eq!(
        got.copies[0].rate_bps, 0.0,
        "a non-finite rate is stored as 0"
    );
    assert_eq!(got.copies[0].sha256, copy.sha256);
    // Not due while the job runs, nor before the delay.
    assert!(s.cleanups_due(Utc::now()).await.unwrap().is_empty());
    s.complete_migration(m.id, None).await.expect("complete");
    assert!(s
        .cleanups_due(Utc::now() - Duration::seconds(60))
        .await
        .unwrap()
        .is_empty());
    let due = s
        .cleanups_due(Utc::now() + Duration::seconds(1))
        .await
        .unwrap();
    assert_eq!(due.len(), 1);
    let cleaned = s.mark_cleaned_up(m.id).await.expect("cleaned");
    assert!(cleaned.cleaned_up_at.is_some());
    assert!(!cleaned.copies[0].source_kept);
    let again = s.mark_cleaned_up(m.id).await.expect("again");
    assert_eq!(
        again.cleaned_up_at, cleaned.cleaned_up_at,
        "the first time stays"
    );
    assert!(s
        .cleanups_due(Utc::now() + Duration::seconds(1))
        .await
        .unwrap()
        .is_empty());
    // The spec Ferry writes after creation.
    let mut spec = spec();
    spec.memory_mib = 333;
    s.set_instance_spec(id, &spec).await.expect("spec");
    assert_eq!(
        s.get_instance("vm1")
            .await
            .unwrap()
            .unwrap()
            .spec
            .memory_mib,
        333
    );
    assert!(matches!(
        s.set_instance_spec(Uuid::new_v4(), &spec).await,
        Err(StoreError::NotFound(_))
    ));
}

#[tokio::test]
async fn a_host_pairs_send_rate_is_learned_as_the_planner_learns_it() {
    let s = Store::open_memory().await.expect("open");
    assert_eq!(s.send_rate("a", "b").await.expect("read"), None);
    let mut expected = None;
    for observed in [400e6, 200e6, 350e6] {
        let learned = s.learn_send_rate("a", "b", observed).await.expect("learn");
        let want = ferry_migrate::plan::learn_rate(expected, observed);
        assert!(
            (learned.rate_bps - want).abs() < 1e-3,
            "{learned:?} vs {want}"
        );
        expected = Some(want);
    }
    let pair = s.send_rate("a", "b").await.expect("read").expect("learned");
    assert_eq!(pair.migrations, 3);
    assert!(
        (pair.rate_bps - 325e6).abs() < 1e-3,
        "400, 300, 325: {pair:?}"
    );
    // Each direction is a pair of its own.
    assert_eq!(s.send_rate("b", "a").await.expect("read"), None);
    let back = s.learn_send_rate("b", "a", 100e6).await.expect("learn");
    assert_eq!((back.rate_bps, back.migrations), (100e6, 1));
    // A source's ceiling is the fastest it reached to any host.
    s.learn_send_rate("a", "c", 500e6).await.expect("learn");
    assert_eq!(s.source_send_rate("a").await.expect("read"), Some(500e6));
    assert_eq!(s.source_send_rate("b").await.expect("read"), Some(100e6));
    assert_eq!(s.source_send_rate("z").await.expect("read"), None);
    // The switchover is learned the same way, on a pair that has a rate.
    assert_eq!(pair.switchover_ms, None);
    assert_eq!(
        s.learn_switchover("a", "b", 20.0).await.expect("learn"),
        Some(20.0)
    );
    let second = s.learn_switchover("a", "b", 40.0).await.expect("learn");
    let want = ferry_migrate::plan::learn_rate(Some(20.0), 40.0);
    assert!(
        (second.unwrap() - want).abs() < 1e-9,
        "{second:?} vs {want}"
    );
    let read = s.send_rate("a", "b").await.expect("read").expect("learned");
    assert_eq!(read.switchover_ms, second);
    assert_eq!(
        s.learn_switchover("x", "y", 5.0).await.expect("no pair"),
        None
    );
}

#[tokio::test]
async fn a_measured_link_is_kept_per_direction_and_replaced_by_the_next_measurement() {
    let s = Store::open_memory().await.expect("open");
    assert_eq!(s.link("a", "b").await.expect("read"), None);
    s.record_link("a", "b", 950.0).await.expect("record");
    let first = s.link("a", "b").await.expect("read").expect("stored");
    assert_eq!(first.bandwidth_mbit_s, 950.0);
    s.record_link("a", "b", 400.0).await.expect("record");
    let second = s.link("a", "b").await.expect("read").expect("stored");
    assert_eq!(second.bandwidth_mbit_s, 400.0);
    assert!(second.measured_at >= first.measured_at);
    assert_eq!(s.link("b", "a").await.expect("read"), None);
}

/// Transactions that read before they write (recording a cleanup reads the job first) must
/// not fail while other connections write: SQLite's WAL refuses to upgrade a read snapshot
/// that another writer made stale (`SQLITE_BUSY_SNAPSHOT`, "database is locked", which the
/// busy timeout does not wait out), so every transaction takes the write lock when it begins.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_then_write_transactions_survive_concurrent_writers() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(&dir.path().join("ferry.db"))
        .await
        .expect("open");
    s.join_host("a", "http://a:7001", "secret-a", &facts("a"))
        .await
        .expect("join a");
    s.join_host("b", "http://b:7001", "secret-b", &facts("b"))
        .await
        .expect("join b");
    let mut jobs = Vec::new();
    for i in 0..8 {
        let id = Uuid::new_v4();
        s.insert_instance(id, &format!("vm{i}"), "a", &spec(), InstanceState::Running)
            .await
            .expect("insert");
        let m = s.insert_migration(&new_migration(id)).await.expect("job");
        jobs.push(m.id);
    }
    let mut tasks = Vec::new();
    for (i, id) in jobs.iter().copied().enumerate() {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..40 {
                // A writer on its own job, and a read-then-write one on it.
                s.add_log(id, "info", &format!("line {i}.{round}"))
                    .await
                    .map_err(|e| e.to_string())?;
                s.mark_cleaned_up(id).await.map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(())
        }));
    }
    for t in tasks {
        t.await
            .unwrap()
            .expect("no transaction fails under concurrent writers");
    }
}
