//! The web panel in real headless Chromium (Debian's `chromium` and `chromium-driver`, driven
//! over WebDriver) against a real server, agents in lab namespaces and a lab guest: sign-in,
//! the Live Migrate dialog with non-default options and its review, the live migration screen
//! to Completed, the instance on its new host, a bandwidth-capped migration cancelled from its
//! screen with the guest still on its source, and a read-only token that sees no actions and
//! whose forged action posts are refused. Every page visited is saved as a screenshot under
//! `target/panel-shots/`.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Cluster, ADMIN};
use ferry_api::instances::{Instance, InstanceState};
use ferry_api::migrations::{MigrationOptions, MigrationState};
use ferry_server::config::Limits;
use thirtyfour::components::SelectElement;
use thirtyfour::prelude::*;

/// Where the screenshots go: `target/panel-shots/`.
fn shots_dir() -> PathBuf {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let target = tmp.parent().map(PathBuf::from).unwrap_or(tmp);
    target.join("panel-shots")
}

/// Headless Chromium behind a chromedriver of its own on a free port. Dropping it (also
/// when a test fails) kills chromedriver's process group and any Chromium process still
/// using this browser's profile directory: nothing outlives the test.
struct Browser {
    driver: Option<WebDriver>,
    chromedriver: Child,
    profile: tempfile::TempDir,
    base: String,
    test: &'static str,
    shots: usize,
}

impl Browser {
    async fn start(test: &'static str, base: &str) -> Browser {
        let port = ferry_lab::net::free_local_ports(1).expect("a free port")[0];
        let mut cmd = Command::new("chromedriver");
        cmd.arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let chromedriver = cmd
            .spawn()
            .expect("chromedriver runs (apt-get install chromium-driver; scripts/setup)");
        let profile = tempfile::tempdir().expect("profile dir");
        let mut b = Browser {
            driver: None,
            chromedriver,
            profile,
            base: base.to_string(),
            test,
            shots: 0,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut caps = DesiredCapabilities::chrome();
        caps.set_binary("/usr/bin/chromium").unwrap();
        for arg in [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--window-size=1280,1000",
            "--no-first-run",
        ] {
            caps.add_arg(arg).unwrap();
        }
        caps.add_arg(&format!("--user-data-dir={}", b.profile.path().display()))
            .unwrap();
        let driver = WebDriver::new(format!("http://127.0.0.1:{port}"), caps)
            .await
            .expect("a Chromium session");
        driver.set_window_rect(0, 0, 1280, 1000).await.unwrap();
        b.driver = Some(driver);
        std::fs::create_dir_all(shots_dir()).unwrap();
        b
    }

    fn d(&self) -> &WebDriver {
        self.driver.as_ref().expect("session open")
    }

    async fn goto(&self, path: &str) {
        self.d()
            .goto(format!("{}{path}", self.base))
            .await
            .unwrap_or_else(|e| panic!("open {path}: {e}"));
    }

    /// Saves the page as `target/panel-shots/TEST-NN-NAME.png`.
    async fn shot(&mut self, name: &str) {
        self.shots += 1;
        let path = shots_dir().join(format!("{}-{:02}-{name}.png", self.test, self.shots));
        self.d().screenshot(&path).await.unwrap();
    }

    async fn find(&self, css: &str) -> WebElement {
        self.d()
            .query(By::Css(css))
            .wait(Duration::from_secs(30), Duration::from_millis(100))
            .first()
            .await
            .unwrap_or_else(|e| panic!("no element {css}: {e}"))
    }

    async fn count(&self, css: &str) -> usize {
        self.d().find_all(By::Css(css)).await.unwrap().len()
    }

    /// The element's text; found again when a live update replaced it between the lookup
    /// and the read (a stale element), which the live screen does several times a second.
    async fn text(&self, css: &str) -> String {
        for _ in 0..20 {
            match self.find(css).await.text().await {
                Ok(t) => return t,
                Err(e) if format!("{e:?}").contains("StaleElementReference") => continue,
                Err(e) => panic!("text of {css}: {e}"),
            }
        }
        panic!("{css} kept being replaced while read")
    }

    /// The element's attribute, found again like [`Self::text`].
    async fn attr(&self, css: &str, name: &str) -> String {
        for _ in 0..20 {
            match self.find(css).await.attr(name).await {
                Ok(v) => return v.unwrap_or_default(),
                Err(e) if format!("{e:?}").contains("StaleElementReference") => continue,
                Err(e) => panic!("{name} of {css}: {e}"),
            }
        }
        panic!("{css} kept being replaced while read")
    }

    async fn path(&self) -> String {
        self.d().current_url().await.unwrap().path().to_string()
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        e.clear().await.unwrap();
        e.send_keys(text).await.unwrap();
    }

    async fn select(&self, css: &str, value: &str) {
        let e = self.find(css).await;
        SelectElement::new(&e)
            .await
            .unwrap()
            .select_by_value(value)
            .await
            .unwrap_or_else(|err| panic!("select {value} in {css}: {err}"));
    }

    async fn sign_in(&mut self, token: &str) {
        self.goto("/").await;
        assert_eq!(
            self.path().await,
            "/signin",
            "signed out, / leads to sign-in"
        );
        self.shot("signin").await;
        self.type_into("#token", token).await;
        self.find("form[action='/signin'] button")
            .await
            .click()
            .await
            .unwrap();
        if self.d().find(By::Css("#who")).await.is_err() {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        if self.d().find(By::Css("#who")).await.is_err() {
            self.shot("signin-failed").await;
            panic!(
                "not signed in at {}: {}",
                self.path().await,
                self.d().source().await.unwrap_or_default()
            );
        }
        assert_eq!(self.path().await, "/instances");
    }

    /// A post from the page itself (the cookie goes along), as a forged form would send it:
    /// returns the status and body.
    async fn post_from_page(&self, path: &str, body: &str) -> (u64, String) {
        let ret = self
            .d()
            .execute(
                "var x = new XMLHttpRequest(); x.open('POST', arguments[0], false); \
                 x.setRequestHeader('Content-Type', 'application/x-www-form-urlencoded'); \
                 x.send(arguments[1]); return [x.status, x.responseText];",
                vec![serde_json::json!(path), serde_json::json!(body)],
            )
            .await
            .unwrap();
        let v = ret.json().clone();
        (
            v[0].as_u64().unwrap_or(0),
            v[1].as_str().unwrap_or("").to_string(),
        )
    }

    async fn close(mut self) {
        if let Some(d) = self.driver.take() {
            let _ = d.quit().await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // SAFETY: kill(2) with our own child's process group id.
        unsafe {
            libc::kill(-(self.chromedriver.id() as i32), libc::SIGKILL);
        }
        let _ = self.chromedriver.wait();
        // Chromium processes that left the group: found by this browser's own profile dir.
        let marker = format!("--user-data-dir={}", self.profile.path().display());
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for e in dir.flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline)
                    .split('\0')
                    .any(|a| a == marker)
                {
                    // SAFETY: kill(2) of a process that runs this test's browser profile.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
        }
    }
}

fn base(c: &Cluster) -> String {
    // `localhost`, not 127.0.0.1: browsers treat it as a secure context, so the session
    // cookie's Secure attribute holds over plain HTTP in the test.
    format!("http://localhost:{}", c.server.addr.port())
}

/// Waits for the migration screen's state, returning how many live updates it counted.
async fn wait_screen_state(b: &Browser, want: &str, patience: Duration) -> u64 {
    let deadline = Instant::now() + patience;
    loop {
        let state = b.attr("#screen", "data-state").await;
        if state == want {
            return b.attr("#screen", "data-updates").await.parse().unwrap_or(0);
        }
        assert!(
            Instant::now() < deadline,
            "the screen stayed {state}, not {want}: {}",
            b.text("#log").await
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_admin_migrates_live_and_cancels_a_capped_migration_in_the_panel() {
    let c = Cluster::start(2, Limits::default()).await;
    let inst = c.running_vm("web-1", "hv1", 71).await;
    let mut b = Browser::start("live", &base(&c)).await;
    b.sign_in(ADMIN).await;
    b.shot("instances").await;

    // Open the instance, then the dialog.
    b.find("a[href^='/instances/']").await;
    b.d()
        .find(By::LinkText("web-1"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    assert_eq!(b.text("[data-f='host']").await, "hv1");
    b.shot("instance").await;
    b.find("#live-migrate").await.click().await.unwrap();
    b.find("#destination").await;
    b.shot("dialog").await;
    // hv2's verdict is in the dropdown; every check is a click away.
    let hv2 = b.text("#destination option[value='hv2']").await;
    assert!(hv2.contains("hv2: fits"), "{hv2}");
    b.find("details[data-checks='hv2'] summary")
        .await
        .click()
        .await
        .unwrap();
    assert!(b.count("details[data-checks='hv2'] tbody tr").await >= 3);
    assert!(b
        .text("#ip-reason")
        .await
        .contains("does not manage networks"));
    b.shot("dialog-checks").await;

    // Non-default options: hv2, a 32 MiB/s cap, auto-converge, 2 channels, 500 ms pause.
    b.select("#destination", "hv2").await;
    b.type_into("#bandwidth", "32").await;
    b.find("#advanced summary").await.click().await.unwrap();
    b.find("#auto_converge").await.click().await.unwrap();
    b.type_into("#parallel", "2").await;
    b.type_into("#downtime", "500").await;
    b.shot("dialog-options").await;
    b.find("#review").await.click().await.unwrap();
    let strategy = b.text("#pred-strategy").await;
    assert!(!strategy.is_empty(), "the review shows the plan");
    assert!(!b.text("#pred-time").await.is_empty());
    assert!(b.text("#pred-pause").await.contains("ms"));
    b.shot("review").await;
    b.find("#start").await.click().await.unwrap();

    // The live screen: it updates from the event stream and reaches Completed.
    b.find("#screen").await;
    assert!(b.path().await.starts_with("/migrations/"));
    let id = b
        .path()
        .await
        .trim_start_matches("/migrations/")
        .to_string();
    b.shot("migration-start").await;
    let mut seen_elapsed = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut mid_shots = 0;
    loop {
        let state = b.attr("#screen", "data-state").await;
        let elapsed = b.text("[data-f='elapsed']").await;
        if !elapsed.is_empty()
            && seen_elapsed.insert(elapsed)
            && mid_shots < 2
            && seen_elapsed.len() >= 3
        {
            mid_shots += 1;
            b.shot("migration-live").await;
        }
        if state == "completed" {
            break;
        }
        assert!(
            !["failed", "cancelled"].contains(&state.as_str()) && Instant::now() < deadline,
            "the migration ended {state}: {}",
            c.logs(id.parse().unwrap()).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let updates: u64 = b.attr("#screen", "data-updates").await.parse().unwrap();
    assert!(updates >= 3, "only {updates} live updates");
    assert!(
        seen_elapsed.len() >= 3,
        "the figures changed only {} times: {seen_elapsed:?}",
        seen_elapsed.len()
    );
    assert_eq!(b.text("#final-host").await, "hv2");
    assert_ne!(b.text("#final-pause").await, "—");
    assert!(
        b.count("#chart-remaining polyline").await == 1,
        "the chart is drawn"
    );
    b.shot("migration-completed").await;
    // Phone width: the same screen, one column.
    b.d().set_window_rect(0, 0, 390, 1600).await.unwrap();
    b.shot("migration-phone").await;
    b.d().set_window_rect(0, 0, 1280, 1000).await.unwrap();

    // The instance is on its new host.
    b.goto(&format!("/instances/{}", inst.id)).await;
    assert_eq!(b.text("[data-f='host']").await, "hv2");
    b.shot("instance-moved").await;

    // A second migration, capped to 1 MiB/s, cancelled from its screen.
    b.find("#live-migrate").await.click().await.unwrap();
    b.select("#destination", "hv1").await;
    b.type_into("#bandwidth", "1").await;
    b.find("#review").await.click().await.unwrap();
    b.find("#start").await.click().await.unwrap();
    b.find("#screen").await;
    let id2: uuid::Uuid = b
        .path()
        .await
        .trim_start_matches("/migrations/")
        .parse()
        .unwrap();
    wait_screen_state(&b, "migrating", Duration::from_secs(120)).await;
    b.shot("capped-migrating").await;
    b.find("#controls button.danger")
        .await
        .click()
        .await
        .unwrap();
    let confirm = b.find("#confirm[open]").await;
    assert!(confirm
        .text()
        .await
        .unwrap()
        .contains("keeps running on hv2"));
    b.shot("cancel-confirm").await;
    b.find("#confirm-ok").await.click().await.unwrap();
    wait_screen_state(&b, "cancelled", Duration::from_secs(120)).await;
    b.find("#report").await;
    assert_eq!(b.text("#final-host").await, "hv2");
    b.shot("capped-cancelled").await;
    let m = c.wait_end(id2, Duration::from_secs(60)).await;
    assert_eq!(m.state, MigrationState::Cancelled);
    let i: Instance = c.instance("web-1").await;
    assert_eq!((i.host.as_str(), i.state), ("hv2", InstanceState::Running));
    c.guest_control(71, "status", Duration::from_secs(20)).await;

    // The lists: history with a filter, the queue, the hosts.
    b.goto("/migrations?state=cancelled").await;
    assert_eq!(b.count("tr[data-migration-row]").await, 1);
    b.shot("migrations-cancelled").await;
    b.goto("/migrations").await;
    assert_eq!(b.count("tr[data-migration-row]").await, 2);
    b.shot("migrations").await;
    b.goto("/hosts").await;
    assert_eq!(b.count("article[data-host]").await, 2);
    b.shot("hosts").await;

    b.close().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_only_token_sees_no_actions_and_its_forged_posts_are_refused() {
    let c = Cluster::start(2, Limits::default()).await;
    let inst = c.running_vm("ro-1", "hv1", 72).await;
    let m = c.migrate("ro-1", "hv2", MigrationOptions::default()).await;
    let m = c.wait_end(m.id, Duration::from_secs(180)).await;
    assert_eq!(m.state, MigrationState::Completed, "{}", c.logs(m.id).await);
    let (_, viewer) = c
        .server
        .state
        .store
        .create_token("viewer", ferry_server::store::Role::ReadOnly)
        .await
        .unwrap();

    let mut b = Browser::start("readonly", &base(&c)).await;
    b.sign_in(&viewer).await;
    assert_eq!(b.attr("#who", "data-role").await, "read-only");
    b.shot("instances").await;
    for (path, name) in [
        (format!("/instances/{}", inst.id), "instance"),
        ("/hosts".to_string(), "hosts"),
        (format!("/migrations/{}", m.id), "migration"),
        ("/migrations".to_string(), "migrations"),
    ] {
        b.goto(&path).await;
        b.find("#main h1").await;
        // Every page is readable; the only form is sign-out, and no action link is shown.
        let forms = b.count("main form[method='post']").await;
        assert_eq!(forms, 0, "{path} shows {forms} action forms");
        assert_eq!(
            b.count("#live-migrate, #cold-migrate, #controls, #actions")
                .await,
            0,
            "{path}"
        );
        b.shot(name).await;
    }

    // Forged posts from the signed-in page, with the session's own CSRF token: the API
    // refuses them as it refuses the CLI.
    let csrf = b
        .attr("form[action='/signout'] input[name='csrf']", "value")
        .await;
    for path in [
        format!("/instances/{}/stop", inst.id),
        "/hosts/hv1/disable".to_string(),
    ] {
        let (status, body) = b.post_from_page(&path, &format!("csrf={csrf}")).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert!(body.contains("read-only"), "{path}: {body}");
    }
    let (status, body) = b
        .post_from_page(
            &format!("/instances/{}/migrate", inst.id),
            &format!("csrf={csrf}&step=start&destination=hv1&ip=keep"),
        )
        .await;
    assert_eq!(
        status, 403,
        "the dialog comes back with the refusal: {body}"
    );
    assert!(
        body.contains("read-only") && body.contains("forbidden"),
        "{body}"
    );
    b.shot("forged-refused").await;

    // Without the CSRF token, or from another site, even an admin's cookie acts on nothing.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let url = format!("{}/instances/{}/stop", base(&c), inst.id);
    let cookie = format!("ferry_session={ADMIN}");
    let r = http
        .post(&url)
        .header("cookie", &cookie)
        .form(&[("csrf", "0000")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert!(r.text().await.unwrap().contains("csrf-refused"));
    let r = http
        .post(&url)
        .header("cookie", &cookie)
        .header("origin", "https://evil.example")
        .form(&[("csrf", ferry_panel::session::csrf_for(ADMIN))])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);

    let i = c.instance("ro-1").await;
    assert_eq!((i.host.as_str(), i.state), ("hv2", InstanceState::Running));
    let hosts: Vec<ferry_api::hosts::Host> = c.admin.get("/v1/hosts").await.unwrap();
    assert!(hosts.iter().all(|h| h.enabled));

    b.close().await;
    c.shutdown().await;
}
