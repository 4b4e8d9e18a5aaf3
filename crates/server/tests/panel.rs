//! The web panel in real headless Chromium (Debian's `chromium` and `chromium-driver`, driven
//! over WebDriver) against a real server, agents in lab namespaces and a lab guest: sign-in,
//! the Live Migrate dialog with non-default options, its review and the job the server made
//! of them, the live migration screen to Completed and its charts' whole history when opened
//! again, the instance on its new host, a bandwidth-capped migration re-paced and cancelled
//! from its screen with the guest still on its source; post-copy behind its acknowledged risk
//! and switched to from the screen; stop, cold Migrate and start of an instance, disable and
//! enable of a host, sign-out; a reader token that sees no actions and whose forged
//! action posts are refused, an operator token that sees guest actions and no host action;
//! storage mapping per disk (shared disks stay in place) reaching
//! the job, the disk copy on the live screen, a job queued behind a destination's inbound
//! limit, the list's filters, phone width without sideways scrolling, a keyboard-only path
//! to the dialog, and a refused pace value's error box. Every page visited is saved as a
//! screenshot under `target/panel-shots/`.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Cluster, ADMIN};
use ferry_api::instances::{CreateInstance, DiskRequest, Instance, InstanceState};
use ferry_api::migrations::{Migration, MigrationOptions, MigrationState, Policy, SamplePage};
use ferry_server::config::Limits;
use thirtyfour::components::SelectElement;
use thirtyfour::prelude::*;
use thirtyfour::TypingData;

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
        // Chromium trusts exactly the server's certificate (its public key), nothing else.
        let authority = base.trim_start_matches("https://");
        let port_part = authority
            .rsplit(':')
            .next()
            .expect("a port in the base URL");
        let chain =
            ferry_pki::tls::probe_server_chain(&format!("127.0.0.1:{port_part}"), "localhost")
                .await
                .expect("the server presents a certificate");
        let spki = ferry_pki::tls::spki_sha256_base64(&chain[0]).expect("a parsable certificate");
        let mut caps = DesiredCapabilities::chrome();
        caps.set_binary("/usr/bin/chromium").unwrap();
        caps.add_arg(&format!("--ignore-certificate-errors-spki-list={spki}"))
            .unwrap();
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
                Err(e) if replaced(&e) => continue,
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
                Err(e) if replaced(&e) => continue,
                Err(e) => panic!("{name} of {css}: {e}"),
            }
        }
        panic!("{css} kept being replaced while read")
    }

    /// Clicks the element, found again when a live update replaced it in between.
    async fn click(&self, css: &str) {
        for _ in 0..20 {
            match self.find(css).await.click().await {
                Ok(()) => return,
                Err(e) if replaced(&e) => continue,
                Err(e) => panic!("click {css}: {e}"),
            }
        }
        panic!("{css} kept being replaced while clicked")
    }

    /// Waits until the migration screen's server-rendered sections (actions, plan, log)
    /// show `state`, so that a form filled now is not replaced under the test.
    async fn wait_sections(&self, state: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let shown = self.attr("#screen", "data-sections").await;
            if shown == state {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the screen's sections stayed at {shown}, not {state}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn path(&self) -> String {
        self.d().current_url().await.unwrap().path().to_string()
    }

    /// Waits for a migration screen and returns the id of the job it shows.
    async fn screen_id(&self) -> uuid::Uuid {
        self.find("#screen").await;
        let path = self.path().await;
        path.strip_prefix("/migrations/")
            .and_then(|id| id.parse().ok())
            .unwrap_or_else(|| panic!("a migration screen, not {path}"))
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
    // The panel is served over HTTPS like the API; `localhost` is in the server's certificate.
    format!("https://localhost:{}", c.server.addr.port())
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

/// Waits until the migration screen has loaded the job's stored samples, returning how many
/// points its remaining-memory chart then draws.
async fn chart_history(b: &Browser) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    while b.attr("#screen", "data-history").await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the screen never loaded its history"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.attr("#chart-remaining", "data-points")
        .await
        .parse()
        .unwrap_or(0)
}

/// Waits (through the API) until job `id` satisfies `reached`; panics if it ends first or
/// `patience` runs out.
async fn wait_job(
    c: &Cluster,
    id: uuid::Uuid,
    patience: Duration,
    reached: impl Fn(&Migration) -> bool,
) -> Migration {
    let deadline = Instant::now() + patience;
    loop {
        let m = c.migration(id).await;
        if reached(&m) {
            return m;
        }
        assert!(
            !m.state.is_terminal() && Instant::now() < deadline,
            "never reached: {m:?}\n{}",
            c.logs(id).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
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

    // Non-default options: hv2, a 32 MiB/s cap, auto-converge, 2 channels, 500 ms pause,
    // a 300 s budget.
    b.select("#destination", "hv2").await;
    b.type_into("#bandwidth", "32").await;
    b.find("#advanced summary").await.click().await.unwrap();
    b.find("#auto_converge").await.click().await.unwrap();
    b.type_into("#parallel", "2").await;
    b.type_into("#downtime", "500").await;
    b.type_into("#budget", "300").await;
    b.shot("dialog-options").await;
    b.find("#review").await.click().await.unwrap();
    let strategy = b.text("#pred-strategy").await;
    assert!(!strategy.is_empty(), "the review shows the plan");
    assert!(!b.text("#pred-time").await.is_empty());
    assert!(b.text("#pred-pause").await.contains("ms"));
    // The review's options list says what will be asked for.
    let listed = b.text("#review-options").await;
    for line in [
        "Destination: hv2",
        "Bandwidth limit: 32 MiB/s",
        "QEMU's pause target: 500 ms",
        "Auto-converge: on",
        "Compression: off",
        "Parallel channels: 2",
        "Time budget: 300 s, then abort",
        "Post-copy: not permitted",
    ] {
        assert!(
            listed.contains(line),
            "{line:?} not in the review: {listed}"
        );
    }
    b.shot("review").await;
    b.find("#start").await.click().await.unwrap();

    // The live screen: it updates from the event stream and reaches Completed.
    let id = b.screen_id().await.to_string();
    b.shot("migration-start").await;
    // The job the server queued carries exactly what the dialog set.
    let job = c.migration(id.parse().unwrap()).await;
    assert_eq!(
        (job.source.as_str(), job.destination.as_str(), job.kind),
        ("hv1", "hv2", ferry_api::migrations::MigrationKind::Live)
    );
    let o = &job.options;
    assert_eq!(o.bandwidth_mib_s, Some(32), "{o:?}");
    assert_eq!(o.downtime_ms, Some(500), "{o:?}");
    assert_eq!(o.parallel, Some(2), "{o:?}");
    assert_eq!(o.budget_s, Some(300), "{o:?}");
    assert!(o.auto_converge && !o.compress && !o.post_copy, "{o:?}");
    assert_eq!(o.policy, Policy::Auto, "{o:?}");
    assert_eq!(o.timeout_action, None, "{o:?}");
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
    // Phone width: the same screen with its report, one column, no sideways scrolling.
    fits_a_phone(&mut b, "migration-completed").await;

    // Opened again after the end, the screen draws the job's whole course from its stored
    // samples (not only the final record).
    b.goto(&format!("/migrations/{id}")).await;
    let points = chart_history(&b).await;
    assert!(
        points > 1,
        "a screen opened after completion shows {points} chart point(s)"
    );
    let samples: SamplePage = c
        .admin
        .get(&format!("/v1/migrations/{id}/samples"))
        .await
        .unwrap();
    assert!(
        points <= samples.samples.len() + 1,
        "{points} points drawn from {} stored samples",
        samples.samples.len()
    );
    b.shot("migration-reopened").await;

    // The instance is on its new host.
    b.goto(&format!("/instances/{}", inst.id)).await;
    assert_eq!(b.text("[data-f='host']").await, "hv2");
    b.shot("instance-moved").await;

    // A second migration, capped to 1 MiB/s with the manual policy (no controller to move
    // the cap, no throttle to make it converge), re-paced and then cancelled from its screen.
    b.find("#live-migrate").await.click().await.unwrap();
    b.select("#destination", "hv1").await;
    b.type_into("#bandwidth", "1").await;
    b.find("#advanced summary").await.click().await.unwrap();
    b.select("#policy", "manual").await;
    b.find("#review").await.click().await.unwrap();
    b.find("#start").await.click().await.unwrap();
    let id2 = b.screen_id().await;
    wait_screen_state(&b, "migrating", Duration::from_secs(120)).await;
    b.wait_sections("migrating").await;
    // The copy's first burst is over and QEMU keeps to the 1 MiB/s cap.
    let mib = 1048576.0;
    wait_job(&c, id2, Duration::from_secs(60), |m| {
        m.progress
            .as_ref()
            .is_some_and(|p| p.elapsed_ms >= 3000 && p.throughput_bps < 1.5 * mib)
    })
    .await;
    b.shot("capped-migrating").await;

    // The pace form: 3 MiB/s and a 400 ms pause target reach the job and its source QEMU.
    b.type_into("#pace-bandwidth", "3").await;
    b.type_into("#pace-downtime", "400").await;
    b.shot("pace-form").await;
    b.click("form.pace button").await;
    b.find("#screen").await;
    assert_eq!(b.path().await, format!("/migrations/{id2}"));
    let paced = c.migration(id2).await;
    assert_eq!(
        (paced.options.bandwidth_mib_s, paced.options.downtime_ms),
        (Some(3), Some(400)),
        "{:?}",
        paced.options
    );
    let options_text = b.text("#options").await;
    assert!(
        options_text.contains("bandwidth 3 MiB/s") && options_text.contains("400 ms"),
        "the screen shows the new pacing: {options_text}"
    );
    // From a second after the change on, QEMU sends faster than the old cap allowed.
    let paced_at = paced.progress.as_ref().map_or(0, |p| p.elapsed_ms);
    let faster = wait_job(&c, id2, Duration::from_secs(60), |m| {
        m.progress
            .as_ref()
            .is_some_and(|p| p.elapsed_ms > paced_at + 1000 && p.throughput_bps > 1.8 * mib)
    })
    .await;
    assert_eq!(faster.state, MigrationState::Migrating);
    assert!(c.logs(id2).await.contains("pacing changed by admin"));
    b.shot("capped-repaced").await;
    b.click("#controls button.danger").await;
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

/// The value of a DOM property (not the HTML attribute: a checkbox's `checked`, an input's
/// `required` as the script left them), read by a script in the page.
/// The page's error box shows the server's sentence, hint and code.
async fn assert_error_box(b: &Browser, message: &str, hint: &str, code: &str) {
    for (part, want) in [("message", message), ("hint", hint), ("code", code)] {
        let shown = b.text(&format!(".error .{part}")).await;
        assert!(
            shown.contains(want),
            "error {part}: {want:?} not in {shown:?}"
        );
    }
}

/// The element was replaced while WebDriver read it: Chromium says so as a stale reference,
/// or (when the node goes between lookup and read) as an inspector error about a node that
/// "does not belong to the document". Either way the caller finds it again.
fn replaced(e: &thirtyfour::error::WebDriverError) -> bool {
    let e = format!("{e:?}");
    e.contains("StaleElementReference") || e.contains("does not belong to the document")
}

async fn prop(b: &Browser, id: &str, name: &str) -> serde_json::Value {
    b.d()
        .execute(
            "var e = document.getElementById(arguments[0]); return e ? e[arguments[1]] : null;",
            vec![serde_json::json!(id), serde_json::json!(name)],
        )
        .await
        .unwrap()
        .json()
        .clone()
}

/// Waits until the instance's record satisfies `reached`.
async fn wait_instance(
    c: &Cluster,
    name: &str,
    patience: Duration,
    reached: impl Fn(&Instance) -> bool,
) -> Instance {
    let deadline = Instant::now() + patience;
    loop {
        let i = c.instance(name).await;
        if reached(&i) {
            return i;
        }
        assert!(Instant::now() < deadline, "never reached: {i:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until host `name`'s `enabled` is `want`.
async fn wait_host_enabled(c: &Cluster, name: &str, want: bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let h: ferry_api::hosts::Host = c.admin.get(&format!("/v1/hosts/{name}")).await.unwrap();
        if h.enabled == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} stayed enabled={}",
            h.enabled
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Clicks a button whose form asks for confirmation, checks the question, and confirms.
async fn confirm_action(b: &mut Browser, button: &str, question: &str, shot: &str) {
    b.click(button).await;
    let text = b.text("#confirm[open] #confirm-text").await;
    assert!(text.contains(question), "asked {text:?}, not {question:?}");
    b.shot(shot).await;
    b.click("#confirm-ok").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_admin_switches_to_post_copy_and_runs_instance_and_host_actions_in_the_panel() {
    let c = Cluster::start(2, Limits::default()).await;
    let inst = c.running_vm("pc-1", "hv1", 73).await;
    let mut b = Browser::start("admin", &base(&c)).await;
    b.sign_in(ADMIN).await;
    b.goto(&format!("/instances/{}", inst.id)).await;
    b.shot("instance").await;
    b.click("#live-migrate").await;
    b.find("#destination").await;

    // Post-copy permitted without acknowledging its risk: the browser asks for the tick,
    // and a client that skips that check is refused by the server with its sentence and hint.
    b.select("#destination", "hv2").await;
    b.type_into("#bandwidth", "4").await;
    b.click("#advanced summary").await;
    b.select("#policy", "manual").await;
    b.click("#post_copy").await;
    let warning = b.text("#postcopy-box .warning").await;
    assert!(
        warning.contains(
            "keeps the guest paused on the destination and retries until the link is back"
        ),
        "{warning}"
    );
    assert_eq!(prop(&b, "post_copy_ack", "required").await, true);
    b.shot("postcopy-unacknowledged").await;
    b.d()
        .execute(
            "document.getElementById('post_copy_ack').required = false;",
            vec![],
        )
        .await
        .unwrap();
    b.click("#review").await;
    assert_error_box(
        &b,
        "post-copy was permitted without acknowledging its risk",
        "I understand this risk",
        "invalid-migration-options",
    )
    .await;
    assert_eq!(
        prop(&b, "post_copy", "checked").await,
        true,
        "the dialog keeps what was set"
    );
    b.shot("postcopy-refused").await;
    let queued: Vec<Migration> = c.admin.get("/v1/migrations?instance=pc-1").await.unwrap();
    assert!(queued.is_empty(), "nothing was queued: {queued:?}");

    // Acknowledged: the review says so, and the job is permitted post-copy.
    b.click("#post_copy_ack").await;
    b.click("#review").await;
    let listed = b.text("#review-options").await;
    for line in [
        "Post-copy: permitted (risk acknowledged)",
        "Policy: manual",
        "Bandwidth limit: 4 MiB/s",
    ] {
        assert!(
            listed.contains(line),
            "{line:?} not in the review: {listed}"
        );
    }
    b.shot("postcopy-review").await;
    b.click("#start").await;
    let id = b.screen_id().await;
    let job = c.migration(id).await;
    assert!(job.options.post_copy, "{:?}", job.options);
    assert_eq!(job.options.policy, Policy::Manual);

    // Copying at 4 MiB/s while the guest dirties 8 MiB/s, it would never converge: the
    // operator switches to post-copy from the screen, after a confirmation.
    wait_screen_state(&b, "migrating", Duration::from_secs(120)).await;
    b.wait_sections("migrating").await;
    assert_eq!(b.text("#controls button.warn").await, "Switch to post-copy");
    b.shot("postcopy-migrating").await;
    confirm_action(
        &mut b,
        "#controls button.warn",
        "the guest pauses until the link is back",
        "postcopy-confirm",
    )
    .await;
    wait_screen_state(&b, "completed", Duration::from_secs(240)).await;
    assert_eq!(b.text("#final-host").await, "hv2");
    b.shot("postcopy-completed").await;
    let m = c.wait_end(id, Duration::from_secs(60)).await;
    assert_eq!(m.state, MigrationState::Completed, "{}", c.logs(id).await);
    assert!(c.logs(id).await.contains("switched to post-copy by admin"));
    let samples: SamplePage = c
        .admin
        .get(&format!("/v1/migrations/{id}/samples"))
        .await
        .unwrap();
    assert!(
        samples
            .samples
            .iter()
            .any(|s| s.progress.phase == ferry_migrate::Phase::Postcopy),
        "the job ran in post-copy"
    );
    assert_eq!(c.instance("pc-1").await.host, "hv2");
    c.guest_control(73, "status", Duration::from_secs(30)).await;

    // Stop, through its confirmation.
    b.goto(&format!("/instances/{}", inst.id)).await;
    assert_eq!(b.text("[data-f='host']").await, "hv2");
    confirm_action(
        &mut b,
        "#actions form[action$='/stop'] button",
        "Stop pc-1?",
        "stop-confirm",
    )
    .await;
    wait_instance(&c, "pc-1", Duration::from_secs(120), |i| {
        i.state == InstanceState::Stopped
    })
    .await;
    b.goto(&format!("/instances/{}", inst.id)).await;
    b.find("#cold-migrate").await;
    assert_eq!(b.count("#live-migrate").await, 0);
    b.shot("instance-stopped").await;

    // Migrate (cold) the stopped instance back to hv1.
    b.click("#cold-migrate").await;
    b.find("#destination").await;
    assert!(b.text("#main h1").await.contains("Migrate (cold)"));
    b.select("#destination", "hv1").await;
    b.shot("cold-dialog").await;
    b.click("#review").await;
    assert!(b.text("#prediction").await.contains("cold migration"));
    b.shot("cold-review").await;
    b.click("#start").await;
    let cold = b.screen_id().await;
    wait_screen_state(&b, "completed", Duration::from_secs(120)).await;
    b.shot("cold-completed").await;
    let m = c.wait_end(cold, Duration::from_secs(30)).await;
    assert_eq!(
        (m.kind, m.state),
        (
            ferry_api::migrations::MigrationKind::Cold,
            MigrationState::Completed
        )
    );
    let i = c.instance("pc-1").await;
    assert_eq!((i.host.as_str(), i.state), ("hv1", InstanceState::Stopped));

    // Start it again on its new host (starting cannot hurt: no confirmation).
    b.goto(&format!("/instances/{}", inst.id)).await;
    b.click("#actions form[action$='/start'] button").await;
    wait_instance(&c, "pc-1", Duration::from_secs(120), |i| {
        i.state == InstanceState::Running
    })
    .await;
    c.guest_control(73, "status", Duration::from_secs(90)).await;
    b.goto(&format!("/instances/{}", inst.id)).await;
    b.find("#live-migrate").await;
    assert_eq!(b.text("[data-f='host']").await, "hv1");
    b.shot("instance-started").await;

    // Disable hv2 through its confirmation, then enable it.
    b.goto("/hosts").await;
    confirm_action(
        &mut b,
        "form[action='/hosts/hv2/disable'] button",
        "Disable hv2?",
        "host-disable-confirm",
    )
    .await;
    wait_host_enabled(&c, "hv2", false).await;
    b.goto("/hosts").await;
    let hv2 = b.text("article[data-host='hv2'] header").await;
    assert!(hv2.to_lowercase().contains("disabled"), "{hv2}");
    assert_eq!(
        b.count("article[data-host='hv1'] .badge.st-disabled").await,
        0,
        "only hv2 is disabled"
    );
    b.find("form[action='/hosts/hv2/enable']").await;
    b.shot("host-disabled").await;
    b.click("form[action='/hosts/hv2/enable'] button").await;
    wait_host_enabled(&c, "hv2", true).await;
    b.goto("/hosts").await;
    b.find("form[action='/hosts/hv2/disable']").await;
    b.shot("host-enabled").await;

    // Sign out: the session is gone, and / asks for a token again.
    b.click("form[action='/signout'] button").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while b.path().await != "/signin" {
        assert!(
            Instant::now() < deadline,
            "sign-out stayed at {}",
            b.path().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.goto("/").await;
    assert_eq!(b.path().await, "/signin");
    b.find("#token").await;
    assert_eq!(b.count("#who").await, 0);
    b.goto(&format!("/instances/{}", inst.id)).await;
    assert_eq!(b.path().await, "/signin", "no page without a session");
    b.shot("signed-out").await;

    b.close().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn roles_a_reader_sees_no_actions_and_its_forged_posts_are_refused_an_operator_no_host_actions(
) {
    let c = Cluster::start(2, Limits::default()).await;
    let inst = c.running_vm("ro-1", "hv1", 72).await;
    let m = c.migrate("ro-1", "hv2", MigrationOptions::default()).await;
    let m = c.wait_end(m.id, Duration::from_secs(180)).await;
    assert_eq!(m.state, MigrationState::Completed, "{}", c.logs(m.id).await);
    let (_, viewer) = c
        .server
        .state
        .store
        .create_token("viewer", ferry_server::store::Role::Reader, None)
        .await
        .unwrap();

    let mut b = Browser::start("readonly", &base(&c)).await;
    b.sign_in(&viewer).await;
    assert_eq!(b.attr("#who", "data-role").await, "reader");
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
        if name == "migration" {
            // The charts' history is readable with a read-only token too.
            let points = chart_history(&b).await;
            assert!(points > 1, "a read-only screen draws {points} point(s)");
        }
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
        assert!(body.contains("role is reader"), "{path}: {body}");
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
        body.contains("needs the operator role") && body.contains("forbidden"),
        "{body}"
    );
    b.shot("forged-refused").await;

    // Without the CSRF token, or from another site, even an admin's cookie acts on nothing.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .use_preconfigured_tls((*c.server.client_tls()).clone())
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

    // An operator sees the guest's actions, and still no host action.
    let (_, ops) = c
        .server
        .state
        .store
        .create_token("ops", ferry_server::store::Role::Operator, None)
        .await
        .unwrap();
    let mut o = Browser::start("operator", &base(&c)).await;
    o.sign_in(&ops).await;
    assert_eq!(o.attr("#who", "data-role").await, "operator");
    o.goto(&format!("/instances/{}", inst.id)).await;
    o.find("#main h1").await;
    assert_eq!(o.count("#actions #live-migrate").await, 1);
    assert_eq!(
        o.count(&format!(
            "#actions form[action='/instances/{}/stop']",
            inst.id
        ))
        .await,
        1
    );
    o.goto("/hosts").await;
    o.find("#main h1").await;
    assert_eq!(
        o.count("form[action$='/disable'], form[action$='/enable']")
            .await,
        0,
        "no host action for an operator"
    );
    o.shot("operator-hosts").await;
    o.close().await;
    c.shutdown().await;
}

/// Presses Tab until the focused element matches `css` (checked before the first press, for
/// a page that focuses it itself); panics after `presses` presses.
async fn tab_to(b: &Browser, css: &str, presses: usize) {
    for _ in 0..=presses {
        let on = b
            .d()
            .execute(
                "var a = document.activeElement; return !!(a && a.matches(arguments[0]));",
                vec![serde_json::json!(css)],
            )
            .await
            .unwrap()
            .json()
            .clone();
        if on == true {
            return;
        }
        keys(b, Key::Tab).await;
    }
    panic!("{presses} presses of Tab never reached {css}");
}

/// Types into whatever has the focus, as a keyboard does.
async fn keys(b: &Browser, k: impl Into<TypingData>) {
    b.d().action_chain().send_keys(k).perform().await.unwrap();
}

/// Waits until the browser is at `path`.
async fn wait_path(b: &Browser, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while b.path().await != path {
        assert!(
            Instant::now() < deadline,
            "stayed at {}, not {path}",
            b.path().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// At phone width (390 px) the page at hand scrolls only vertically: nothing is wider than
/// the window. Saves a screenshot of it, then goes back to the desktop size.
async fn fits_a_phone(b: &mut Browser, name: &str) {
    b.d().set_window_rect(0, 0, 390, 900).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let (scroll, inner) = loop {
        let v = b
            .d()
            .execute(
                "return [document.scrollingElement.scrollWidth, window.innerWidth];",
                vec![],
            )
            .await
            .unwrap()
            .json()
            .clone();
        let (scroll, inner) = (v[0].as_u64().unwrap(), v[1].as_u64().unwrap());
        if inner <= 400 || Instant::now() > deadline {
            break (scroll, inner);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        inner <= 400,
        "{name}: the window is {inner} px wide, not a phone's"
    );
    b.shot(&format!("{name}-phone")).await;
    assert!(
        scroll <= inner,
        "{name} at {inner} px is {scroll} px wide: it scrolls sideways"
    );
    b.d().set_window_rect(0, 0, 1280, 1000).await.unwrap();
}

/// The rows of the migrations list now shown, by job id.
async fn listed(b: &Browser) -> Vec<String> {
    let mut ids = Vec::new();
    for r in b
        .d()
        .find_all(By::Css("tr[data-migration-row]"))
        .await
        .unwrap()
    {
        ids.push(
            r.attr("data-migration-row")
                .await
                .unwrap()
                .unwrap_or_default(),
        );
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disks_map_in_the_dialog_jobs_queue_and_filter_and_pages_fit_a_phone_and_the_keyboard() {
    // Three hosts, each with a datastore `local` of its own and a `shared` one they all
    // mount; a destination takes one incoming migration at a time.
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    std::fs::create_dir_all(ds.join("shared")).unwrap();
    let limits = Limits {
        per_host_inbound: 1,
        ..Limits::default()
    };
    let c = Cluster::start_with(3, limits, move |config| {
        common::add_local_datastore(config, &ds);
        config.datastores.push(ferry_agent::DatastoreConfig {
            name: "shared".into(),
            path: ds.join("shared"),
            identity: Some("panel-test-shared".into()),
        });
    })
    .await;
    // disk-1 on hv1: disk0 on hv1's local datastore (the guest writes it), disk1 on the
    // shared one. q-1, stopped on hv3, only ever waits in the queue (no QEMU needed).
    let disk = |id: &str, datastore: &str, size: u64| DiskRequest {
        id: Some(id.into()),
        datastore: Some(datastore.into()),
        size_bytes: Some(size),
        serial: (id == "disk0").then(|| "blk0".into()),
        ..serde_json::from_value(serde_json::json!({})).unwrap()
    };
    let config = ferry_lab::guest_config::GuestConfig {
        disk: Some(ferry_lab::guest_config::GuestDisk {
            rate_blocks_s: 50,
            blocks: Some(4096),
            ..ferry_lab::guest_config::GuestDisk::new("blk0")
        }),
        ..Cluster::small_guest()
    };
    let vm: Instance = c
        .admin
        .post(
            "/v1/instances",
            &CreateInstance {
                name: "disk-1".into(),
                host: Some("hv1".into()),
                spec: c.guest_spec(74, 192, config),
                disks: vec![
                    disk("disk0", "local", 256 << 20),
                    disk("disk1", "shared", 64 << 20),
                ],
                start: true,
            },
        )
        .await
        .unwrap();
    c.guest_control(74, "status", Duration::from_secs(90)).await;
    let q: Instance = c
        .admin
        .post(
            "/v1/instances",
            &CreateInstance {
                name: "q-1".into(),
                host: Some("hv3".into()),
                spec: c.guest_spec(75, 128, Cluster::small_guest()),
                disks: vec![],
                start: false,
            },
        )
        .await
        .unwrap();
    assert_eq!(q.state, InstanceState::Stopped);

    // Keyboard only: Tab to the token, type it, Enter; Tab to the instance, Enter; Tab to
    // Live Migrate, Enter.
    let mut b = Browser::start("disks", &base(&c)).await;
    b.goto("/signin").await;
    tab_to(&b, "#token", 10).await;
    keys(&b, ADMIN).await;
    keys(&b, Key::Enter).await;
    b.find("#who").await;
    assert_eq!(b.path().await, "/instances");
    b.shot("keyboard-signed-in").await;
    tab_to(&b, &format!("a[href='/instances/{}']", vm.id), 30).await;
    keys(&b, Key::Enter).await;
    wait_path(&b, &format!("/instances/{}", vm.id)).await;
    tab_to(&b, "#live-migrate", 30).await;
    b.shot("keyboard-instance").await;
    keys(&b, Key::Enter).await;
    wait_path(&b, &format!("/instances/{}/migrate", vm.id)).await;
    b.find("#destination").await;
    b.shot("keyboard-dialog").await;

    // Storage per disk: the local disk offers a mapping, the shared one stays in place.
    assert_eq!(b.attr("[data-disk='disk0']", "data-shared").await, "false");
    assert_eq!(b.attr("[data-disk='disk1']", "data-shared").await, "true");
    assert!(b
        .text("[data-disk='disk1']")
        .await
        .contains("shared storage: stays where it is"));
    assert_eq!(
        b.count("#disk-disk1").await,
        0,
        "no mapping for shared storage"
    );
    assert_eq!(b.count("#disk-disk0 option[value='local']").await, 1);
    fits_a_phone(&mut b, "dialog").await;
    b.select("#destination", "hv2").await;
    b.select("#disk-disk0", "local").await;
    // A 2 MiB/s cap with the manual policy keeps the job copying (and hv2's only incoming
    // slot taken) until the test lifts it.
    b.type_into("#bandwidth", "2").await;
    b.click("#advanced summary").await;
    b.select("#policy", "manual").await;
    b.shot("dialog-disks").await;
    b.click("#review").await;
    let d0 = b.text("[data-disk-plan='disk0']").await;
    assert!(
        d0.contains("copied to datastore local on the destination"),
        "{d0}"
    );
    let d1 = b.text("[data-disk-plan='disk1']").await;
    assert!(
        d1.contains("on shared datastore shared, stays in place"),
        "{d1}"
    );
    b.shot("review-disks").await;
    b.click("#start").await;
    let id = b.screen_id().await;
    let job = c.migration(id).await;
    assert_eq!(job.destination, "hv2");
    assert_eq!(
        job.options.disk_map,
        [("disk0".to_string(), "local".to_string())]
            .into_iter()
            .collect(),
        "the chosen mapping reaches the job"
    );

    // q-1's cold migration to hv2 waits: hv2's one incoming slot is disk-1's.
    let queued: Migration = c
        .admin
        .post(
            "/v1/migrations",
            &ferry_api::migrations::CreateMigration {
                instance: "q-1".into(),
                destination: Some("hv2".into()),
                options: MigrationOptions::default(),
                kind: Some(ferry_api::migrations::MigrationKind::Cold),
            },
        )
        .await
        .unwrap();

    // The screen shows the disk's copy as it goes.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let done = b.text("[data-f='disk_done']").await;
        let left = b.text("[data-f='disk_left']").await;
        if done.ends_with("iB") && left.ends_with("iB") {
            break;
        }
        let state = b.attr("#screen", "data-state").await;
        assert!(
            !["completed", "failed", "cancelled"].contains(&state.as_str())
                && Instant::now() < deadline,
            "no disk figures ({done:?}, {left:?}) while {state}: {}",
            c.logs(id).await
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let m = wait_job(&c, id, Duration::from_secs(60), |m| {
        m.progress.as_ref().is_some_and(|p| !p.disks.is_empty())
    })
    .await;
    assert_eq!(
        m.progress
            .unwrap()
            .disks
            .iter()
            .map(|d| d.disk.as_str())
            .collect::<Vec<_>>(),
        ["disk0"],
        "only the local disk is copied"
    );
    b.shot("screen-disks").await;
    fits_a_phone(&mut b, "screen").await;
    assert_eq!(
        c.migration(queued.id).await.state,
        MigrationState::Pending,
        "q-1 waits for hv2's slot"
    );

    // The queue: q-1 first in line for hv2.
    b.goto("/migrations").await;
    assert_eq!(b.count("article[data-queue]").await, 1);
    let li = format!("article[data-queue='hv2'] li[data-queued='{}']", queued.id);
    assert_eq!(b.attr(&li, "data-position").await, "1");
    assert!(b.text(&li).await.contains("q-1 from hv3"));
    b.shot("queue").await;
    fits_a_phone(&mut b, "migrations").await;

    // Filters: by host through the form, by instance and state by address.
    b.type_into("form.filters input[name='host']", "hv3").await;
    b.click("form.filters button").await;
    wait_path(&b, "/migrations").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !b
        .d()
        .current_url()
        .await
        .unwrap()
        .as_str()
        .contains("host=hv3")
    {
        assert!(Instant::now() < deadline, "the filter form did not submit");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(listed(&b).await, [queued.id.to_string()], "host=hv3");
    b.shot("filter-host").await;
    b.goto("/migrations?host=hv1").await;
    assert_eq!(listed(&b).await, [id.to_string()], "host=hv1");
    b.goto("/migrations?host=hv2").await;
    assert_eq!(
        listed(&b).await.len(),
        2,
        "host=hv2 is both jobs' destination"
    );
    b.goto("/migrations?instance=disk-1").await;
    assert_eq!(listed(&b).await, [id.to_string()], "instance=disk-1");
    b.goto("/migrations?instance=q-1&state=pending").await;
    assert_eq!(listed(&b).await, [queued.id.to_string()], "q-1, pending");
    b.shot("filter-instance").await;

    b.goto("/hosts").await;
    b.find("article[data-host='hv3']").await;
    fits_a_phone(&mut b, "hosts").await;
    b.goto("/instances").await;
    b.find("#main h1").await;
    fits_a_phone(&mut b, "instances").await;

    // An invalid pace value on the pending job's screen: the server's sentence, hint and
    // code in the page's error box, and the job unchanged.
    b.goto(&format!("/migrations/{}", queued.id)).await;
    b.type_into("#pace-downtime", "99999").await;
    b.click("form.pace button").await;
    assert_error_box(
        &b,
        "downtime target 99999 ms must be between 1 and 60000 ms",
        "fix the named option",
        "invalid-migration-options",
    )
    .await;
    let code = b.text(".error .code").await;
    assert!(code.contains("HTTP 400"), "{code}");
    assert_eq!(b.count(".error").await, 1);
    b.shot("pace-refused").await;
    assert_eq!(c.migration(queued.id).await.options.downtime_ms, None);
    b.goto(&format!("/migrations/{}", queued.id)).await;
    confirm_action(
        &mut b,
        "#controls button.danger",
        "Cancel the migration of q-1?",
        "queued-cancel",
    )
    .await;
    assert_eq!(
        c.wait_end(queued.id, Duration::from_secs(60)).await.state,
        MigrationState::Cancelled
    );

    // Lifting the cap (0 = unlimited) lets disk-1 finish: it runs on hv2, its local disk on
    // hv2's `local`, its shared disk where it was.
    b.goto(&format!("/migrations/{id}")).await;
    b.wait_sections("migrating").await;
    b.type_into("#pace-bandwidth", "0").await;
    b.click("form.pace button").await;
    wait_screen_state(&b, "completed", Duration::from_secs(300)).await;
    assert_eq!(b.text("#final-host").await, "hv2");
    b.shot("disks-completed").await;
    let m = c.wait_end(id, Duration::from_secs(60)).await;
    assert_eq!(m.state, MigrationState::Completed, "{}", c.logs(id).await);
    let i = c.instance("disk-1").await;
    assert_eq!(i.host, "hv2");
    let on = |d: &str| {
        i.spec
            .disks
            .iter()
            .find(|x| x.id == d)
            .map(|x| x.image.datastore.clone())
    };
    assert_eq!(
        (on("disk0").as_deref(), on("disk1").as_deref()),
        (Some("local"), Some("shared"))
    );
    assert_eq!(
        i.spec.disks[1].image, vm.spec.disks[1].image,
        "the shared disk stayed in place"
    );
    let copy = dir.path().join("ds/hv2").join(&i.spec.disks[0].image.file);
    assert!(copy.exists(), "no copy of disk0 at {}", copy.display());
    c.guest_control(74, "status", Duration::from_secs(30)).await;

    b.close().await;
    c.shutdown().await;
}
