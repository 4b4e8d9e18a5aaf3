//! `ferry migrate` (start one) and `ferry migration` (inspect, follow, cancel jobs).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Args, Subcommand};
use ferry_api::checks::{Candidate, CheckResult, CheckStatus};
use ferry_api::migrations::{
    CreateMigration, LogLine, Migration, MigrationKind, MigrationOptions, MigrationState, Policy,
    UpdateMigration,
};
use ferry_migrate::{Progress, TimeoutAction};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use uuid::Uuid;

use super::{seg, Ctx};
use crate::error::{exit, CliError};
use crate::output::{self, Table};

/// `ferry migrate INSTANCE [--to HOST] [--check]`.
#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct MigrateArgs {
    /// Instance name or id.
    pub instance: String,
    /// Destination host (default: the best fit host by the pre-flight checks).
    #[arg(long)]
    pub to: Option<String>,
    /// Only run the pre-flight checks and print them (every candidate, ranked, without
    /// --to); changes nothing. Exit code 0 if the destination (or some host) fits, 1 if not.
    #[arg(long, conflicts_with_all = ["watch", "wait"])]
    pub check: bool,
    /// Start even though checks documented as overridable fail (memory, QEMU version).
    #[arg(long)]
    pub force: bool,
    /// Bandwidth cap in MiB/s (default: unlimited).
    #[arg(long, value_name = "MIB_S")]
    pub bandwidth: Option<u64>,
    /// Longest acceptable pause at switchover, ms (default 300).
    #[arg(long)]
    pub downtime_ms: Option<u64>,
    /// Throttle the guest's vCPUs if it dirties memory faster than it can be sent.
    #[arg(long)]
    pub auto_converge: bool,
    /// Send pages compressed (multifd + zstd).
    #[arg(long)]
    pub compress: bool,
    /// Allow post-copy. Opt-in: once switched, the guest runs on the destination while its
    /// memory follows, and a migration-network failure pauses it until the link is back.
    #[arg(long)]
    pub post_copy: bool,
    /// `auto` (default: measure, predict, choose, escalate on stalls) or `manual` (exactly the
    /// options given).
    #[arg(long, value_parser = parse_policy, default_value = "auto")]
    pub policy: Policy,
    /// Completion budget in seconds (default under auto: 60 s per GiB of RAM, at least 30 s).
    #[arg(long, value_name = "SECONDS")]
    pub budget: Option<u64>,
    /// What happens when the budget runs out: abort (default; the guest stays on the source)
    /// or postcopy (needs --post-copy).
    #[arg(long, value_parser = parse_timeout_action)]
    pub on_timeout: Option<TimeoutAction>,
    /// XBZRLE delta compression of re-sent pages with this cache, MiB.
    #[arg(long, value_name = "MIB")]
    pub xbzrle_cache: Option<u64>,
    /// Parallel migration streams (multifd).
    #[arg(long, value_name = "N")]
    pub parallel: Option<u8>,
    /// Move a stopped instance's definition instead of a running guest.
    #[arg(long)]
    pub cold: bool,
    /// Put local disk DISK on the destination's datastore DATASTORE; repeat for more disks.
    /// Disks not named go to the destination datastore with the most free room that holds
    /// them; disks on storage both hosts share stay where they are.
    #[arg(long = "map-disk", value_name = "DISK=DATASTORE", value_parser = parse_disk_mapping)]
    pub map_disk: Vec<(String, String)>,
    /// Follow it live with a progress bar (one line per event when stdout or stderr is not a
    /// terminal), then print the result.
    #[arg(long, conflicts_with = "wait")]
    pub watch: bool,
    /// Wait for the end without a progress bar, then print the result.
    #[arg(long)]
    pub wait: bool,
}

impl MigrateArgs {
    /// The request `ferry migrate` sends; options are checked here too, so a typo fails before
    /// anything is queued.
    pub fn to_request(&self) -> Result<CreateMigration, CliError> {
        let options = MigrationOptions {
            bandwidth_mib_s: self.bandwidth,
            downtime_ms: self.downtime_ms,
            auto_converge: self.auto_converge,
            compress: self.compress,
            post_copy: self.post_copy,
            force: self.force,
            policy: self.policy,
            budget_s: self.budget,
            timeout_action: self.on_timeout,
            xbzrle_cache_mib: self.xbzrle_cache,
            parallel: self.parallel,
            disk_map: disk_map(&self.map_disk)?,
        };
        options.validate().map_err(CliError::Local)?;
        Ok(CreateMigration {
            instance: self.instance.clone(),
            destination: self.to.clone(),
            options,
            kind: Some(if self.cold {
                MigrationKind::Cold
            } else {
                MigrationKind::Live
            }),
        })
    }
}

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum MigrationCommand {
    /// List migrations, newest first.
    List {
        /// Only this state (pending, preparing, migrating, completing, completed, failed,
        /// cancelled).
        #[arg(long, value_parser = parse_state)]
        state: Option<MigrationState>,
        /// Only this instance (name or id).
        #[arg(long)]
        instance: Option<String>,
        /// Only migrations from or to this host.
        #[arg(long)]
        host: Option<String>,
        /// At most this many.
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Show one migration (full id, or a unique prefix such as the 8 characters of `list`).
    Show { id: String },
    /// Print what Ferry did and what QEMU reported during a migration.
    Logs { id: String },
    /// Ask a migration to stop; the guest keeps running on the source unless switchover
    /// already happened.
    Cancel { id: String },
    /// Follow a migration live until it ends.
    Watch { id: String },
    /// Switch a copying migration to post-copy now (only if started with --post-copy): the
    /// guest continues on the destination at once and its memory follows on demand.
    Postcopy { id: String },
    /// Remove the source's copies of the disks a completed cold migration copied (kept until
    /// then, so that data is preserved on both hosts until you are sure). Repeating is
    /// harmless.
    Cleanup { id: String },
    /// Change the pacing of a pending or copying migration; a copying one follows at once.
    Set {
        id: String,
        /// New bandwidth cap in MiB/s (0: unlimited).
        #[arg(long)]
        bandwidth: Option<u64>,
        /// New downtime target in ms.
        #[arg(long)]
        downtime_ms: Option<u64>,
    },
}

pub fn parse_policy(s: &str) -> Result<Policy, String> {
    match s {
        "auto" => Ok(Policy::Auto),
        "manual" => Ok(Policy::Manual),
        _ => Err(format!("{s:?} is not a policy (auto, manual)")),
    }
}

pub fn parse_timeout_action(s: &str) -> Result<TimeoutAction, String> {
    match s {
        "abort" => Ok(TimeoutAction::Abort),
        "postcopy" | "post-copy" => Ok(TimeoutAction::Postcopy),
        _ => Err(format!("{s:?} is not a timeout action (abort, postcopy)")),
    }
}

/// One `--map-disk` value, checked before anything is queued so a typo names the flag.
pub use ferry_api::migrations::parse_disk_mapping;

/// The request's `disk_map` from the `--map-disk` values (a disk named twice is refused).
pub fn disk_map(mappings: &[(String, String)]) -> Result<BTreeMap<String, String>, CliError> {
    ferry_api::migrations::disk_map(mappings.iter().cloned()).map_err(|why| {
        CliError::new(
            "invalid-migration-options",
            format!("--map-disk {why}"),
            "give each disk at most one --map-disk DISK=DATASTORE",
        )
    })
}

pub fn parse_state(s: &str) -> Result<MigrationState, String> {
    MigrationState::parse(s).ok_or_else(|| {
        format!(
            "{s:?} is not a state (pending, preparing, migrating, completing, completed, \
             failed, cancelled)"
        )
    })
}

/// The query string of `migration list`.
pub fn list_query(
    state: Option<MigrationState>,
    instance: Option<&str>,
    host: Option<&str>,
    limit: Option<u32>,
) -> String {
    let mut q = Vec::new();
    if let Some(s) = state {
        q.push(format!("state={}", s.as_str()));
    }
    if let Some(i) = instance {
        q.push(format!("instance={}", seg(i)));
    }
    if let Some(h) = host {
        q.push(format!("host={}", seg(h)));
    }
    if let Some(l) = limit {
        q.push(format!("limit={l}"));
    }
    if q.is_empty() {
        String::new()
    } else {
        format!("?{}", q.join("&"))
    }
}

/// The exit code a finished migration maps to (non-terminal states are the caller's bug and
/// map to the generic error).
pub fn exit_code_for(state: MigrationState) -> u8 {
    match state {
        MigrationState::Completed => exit::OK,
        MigrationState::Failed => exit::MIGRATION_FAILED,
        MigrationState::Cancelled => exit::MIGRATION_CANCELLED,
        _ => exit::ERROR,
    }
}

/// The path of `ferry migrate --check`: candidates of `instance`, or just `to`, with the
/// local disks mapped as `disk_map` says (the storage check shows the mapping it would use).
pub fn candidates_path(
    instance: &str,
    to: Option<&str>,
    disk_map: &std::collections::BTreeMap<String, String>,
) -> String {
    let mut query = Vec::new();
    if let Some(h) = to {
        query.push(format!("destination={}", seg(h)));
    }
    if !disk_map.is_empty() {
        let pairs: Vec<String> = disk_map.iter().map(|(d, ds)| format!("{d}={ds}")).collect();
        query.push(format!("map_disk={}", seg(&pairs.join(","))));
    }
    let mut p = format!("/v1/instances/{}/migration-candidates", seg(instance));
    if !query.is_empty() {
        p.push('?');
        p.push_str(&query.join("&"));
    }
    p
}

/// One candidate's checks: name, status, message, hint.
pub fn checks_table(c: &Candidate) -> String {
    let mut t = Table::new(&["CHECK", "STATUS", "MESSAGE", "HINT"]);
    for k in &c.checks {
        t.row(vec![
            k.name.clone(),
            status_word(k).to_string(),
            k.message.clone(),
            k.hint.clone(),
        ]);
    }
    let verdict = if c.fit {
        format!("{} fits", c.host)
    } else {
        format!("{} does not fit", c.host)
    };
    format!("{}\n\n{verdict}", t.render())
}

fn status_word(k: &CheckResult) -> &'static str {
    match k.status {
        CheckStatus::Pass => "pass",
        CheckStatus::Warn => "warn",
        CheckStatus::Fail if k.overridable => "FAIL (--force)",
        CheckStatus::Fail => "FAIL",
    }
}

/// Every candidate, best first, with what keeps the unfit ones out.
pub fn candidates_table(list: &[Candidate]) -> String {
    if list.is_empty() {
        return "no other host in the cluster".into();
    }
    let mut t = Table::new(&["RANK", "HOST", "FIT", "FREE RAM", "FAILING CHECKS"]);
    for c in list {
        let failing: Vec<String> = c
            .checks
            .iter()
            .filter(|k| k.status == CheckStatus::Fail)
            .map(|k| format!("{}: {}", k.name, k.message))
            .collect();
        t.row(vec![
            c.rank.to_string(),
            c.host.clone(),
            if c.fit { "yes" } else { "no" }.into(),
            output::fmt_mib(c.free_ram_mib),
            failing.join("; "),
        ]);
    }
    t.render()
}

async fn run_check(ctx: &Ctx, args: &MigrateArgs) -> Result<u8, CliError> {
    let map = disk_map(&args.map_disk)?;
    let list: Vec<Candidate> = ctx
        .get(&candidates_path(&args.instance, args.to.as_deref(), &map))
        .await?;
    let fit = match &args.to {
        Some(_) => {
            let Some(c) = list.first() else {
                return Err(CliError::new(
                    "no-candidate",
                    "the server evaluated no destination",
                    "check the host name with `ferry host list`",
                ));
            };
            ctx.print(c, checks_table);
            c.fit
        }
        None => {
            ctx.print(&list, |l| candidates_table(l));
            list.iter().any(|c| c.fit)
        }
    };
    Ok(if fit { exit::OK } else { exit::ERROR })
}

pub async fn run_migrate(ctx: &Ctx, args: MigrateArgs) -> Result<u8, CliError> {
    if args.check {
        return run_check(ctx, &args).await;
    }
    let req = args.to_request()?;
    let m: Migration = ctx.post("/v1/migrations", &req).await?;
    if !(args.watch || args.wait) {
        ctx.print(&m, output::migration_detail);
        return Ok(exit::OK);
    }
    if args.watch {
        eprintln!(
            "migrating {} from {} to {} (migration {})",
            m.instance_name, m.source, m.destination, m.id
        );
    }
    finish(ctx, m.id, args.watch).await
}

pub async fn run(ctx: &Ctx, cmd: MigrationCommand) -> Result<u8, CliError> {
    match cmd {
        MigrationCommand::List {
            state,
            instance,
            host,
            limit,
        } => {
            let q = list_query(state, instance.as_deref(), host.as_deref(), limit);
            let list: Vec<Migration> = ctx.get(&format!("/v1/migrations{q}")).await?;
            ctx.print(&list, |l| output::migrations_table(l));
        }
        MigrationCommand::Show { id } => {
            let id = resolve_id(ctx, &id).await?;
            let m: Migration = ctx.get(&format!("/v1/migrations/{id}")).await?;
            ctx.print(&m, output::migration_detail);
        }
        MigrationCommand::Logs { id } => {
            let id = resolve_id(ctx, &id).await?;
            let lines: Vec<LogLine> = ctx.get(&format!("/v1/migrations/{id}/logs")).await?;
            ctx.print(&lines, |l| output::logs(l));
        }
        MigrationCommand::Cancel { id } => {
            let id = resolve_id(ctx, &id).await?;
            let m: Migration = ctx
                .post(&format!("/v1/migrations/{id}/cancel"), &())
                .await?;
            ctx.print(&m, output::migration_detail);
        }
        MigrationCommand::Set {
            id,
            bandwidth,
            downtime_ms,
        } => {
            let id = resolve_id(ctx, &id).await?;
            let body = UpdateMigration {
                bandwidth_mib_s: bandwidth,
                downtime_ms,
            };
            let m: Migration = ctx.patch(&format!("/v1/migrations/{id}"), &body).await?;
            ctx.print(&m, output::migration_detail);
        }
        MigrationCommand::Cleanup { id } => {
            let id = resolve_id(ctx, &id).await?;
            let m: Migration = ctx
                .post(&format!("/v1/migrations/{id}/cleanup"), &())
                .await?;
            ctx.print(&m, output::migration_detail);
        }
        MigrationCommand::Postcopy { id } => {
            let id = resolve_id(ctx, &id).await?;
            let m: Migration = ctx
                .post(&format!("/v1/migrations/{id}/postcopy"), &())
                .await?;
            ctx.print(&m, output::migration_detail);
        }
        MigrationCommand::Watch { id } => {
            let id = resolve_id(ctx, &id).await?;
            return finish(ctx, id, true).await;
        }
    }
    Ok(exit::OK)
}

/// A full id, or the one migration whose id starts with `prefix` (lists show 8 characters).
async fn resolve_id(ctx: &Ctx, prefix: &str) -> Result<Uuid, CliError> {
    if let Ok(id) = Uuid::parse_str(prefix) {
        return Ok(id);
    }
    let p = prefix.to_ascii_lowercase().replace('-', "");
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(CliError::new(
            "invalid-migration-id",
            format!("{prefix:?} is not a migration id"),
            "use the id from `ferry migration list` (8 characters are enough)",
        ));
    }
    let all: Vec<Migration> = ctx.get("/v1/migrations").await?;
    let matches: Vec<Uuid> = all
        .iter()
        .map(|m| m.id)
        .filter(|id| id.simple().to_string().starts_with(&p))
        .collect();
    match matches.as_slice() {
        [one] => Ok(*one),
        [] => Err(CliError::new(
            "migration-not-found",
            format!("no migration id starts with {prefix}"),
            "list them with `ferry migration list`",
        )),
        _ => Err(CliError::new(
            "ambiguous-migration-id",
            format!("{} migrations start with {prefix}", matches.len()),
            "give more characters of the id",
        )),
    }
}

/// Follows migration `id` to its end (live bar if `bar`), prints it, and returns its exit
/// code.
pub async fn finish(ctx: &Ctx, id: Uuid, bar: bool) -> Result<u8, CliError> {
    let m = follow(ctx, id, bar).await?;
    ctx.print(&m, output::migration_detail);
    Ok(exit_code_for(m.state))
}

/// Follows migration `id` to its end (live bar on stderr if `bar`) and returns its final
/// record. The event stream drives the bar; the final state always comes from a fresh GET, and
/// if the stream breaks or is missing the function polls instead, so a flaky stream can only
/// make the bar coarser, never the result wrong.
pub async fn follow(ctx: &Ctx, id: Uuid, bar: bool) -> Result<Migration, CliError> {
    follow_observed(ctx, id, bar, |_| {}).await
}

pub use ferry_api::follow::Seen;

/// [`follow`], handing `observe` every record and sample as it arrives, so a caller can act
/// at a moment of the job (read a counter when the copy starts) or time its phases from the
/// samples, without opening a second stream. `observe` runs on the stream's task: it must
/// not block.
pub async fn follow_observed(
    ctx: &Ctx,
    id: Uuid,
    bar: bool,
    mut observe: impl FnMut(Seen<'_>),
) -> Result<Migration, CliError> {
    let pb = bar.then(Watch::new);
    // The auto policy's prediction, shown once above the bar as soon as the plan exists.
    let mut plan_shown = false;
    let mut show_plan = |m: &Migration| {
        if let (Some(pb), Some(plan), false) = (&pb, &m.plan, plan_shown) {
            pb.println(&plan.plan.summary());
            plan_shown = true;
        }
    };
    let m = ferry_api::follow::migration(&ctx.client, id, |seen| {
        observe(seen);
        match seen {
            Seen::Record(m) => {
                show_plan(m);
                if let Some(pb) = &pb {
                    pb.show(m);
                }
            }
            Seen::Sample(p) => {
                if let Some(pb) = &pb {
                    pb.progress(p);
                }
            }
        }
    })
    .await
    .map_err(|e| ctx.api_err(e))?;
    if let Some(pb) = &pb {
        // The end as a line of its own (a bar is cleared: the record follows on stdout).
        pb.show(&m);
        pb.finish();
    }
    Ok(m)
}

/// How `--watch` shows a job: a bar redrawn in place for a person at a terminal, or one line
/// per event where redrawing would only fill a file or a pipe with control codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchStyle {
    Bar,
    Lines,
}

/// The bar only when both outputs are terminals: with stdout redirected (`> log`, `| tee`,
/// CI) the run is being recorded, and a record wants lines.
pub fn watch_style(stdout_is_terminal: bool, stderr_is_terminal: bool) -> WatchStyle {
    if stdout_is_terminal && stderr_is_terminal {
        WatchStyle::Bar
    } else {
        WatchStyle::Lines
    }
}

/// One line of `--watch` on a non-terminal: seconds since watching began, the job's state, and
/// the sample's figures when there is one (with each disk of a block migration after it).
pub fn watch_line(elapsed: Duration, state: MigrationState, progress: Option<&Progress>) -> String {
    let mut line = format!("[{:>6.1}s] {:<10}", elapsed.as_secs_f64(), state.as_str());
    if let Some(p) = progress {
        line.push(' ');
        line.push_str(&output::progress_message(p));
        for d in output::disk_progress_lines(&p.disks) {
            line.push_str("; ");
            line.push_str(&d);
        }
    }
    line.trim_end().to_string()
}

/// What `--watch` draws on stderr, in either [`WatchStyle`].
enum Watch {
    Bar(Bar),
    Lines(Lines),
}

impl Watch {
    fn new() -> Watch {
        match watch_style(
            std::io::stdout().is_terminal(),
            std::io::stderr().is_terminal(),
        ) {
            WatchStyle::Bar => Watch::Bar(Bar::new()),
            WatchStyle::Lines => Watch::Lines(Lines::new()),
        }
    }

    /// A line above the bar (the plan), or one more line.
    fn println(&self, text: &str) {
        match self {
            Watch::Bar(b) => b.pb.println(text),
            Watch::Lines(_) => eprintln!("{text}"),
        }
    }

    fn show(&self, m: &Migration) {
        match self {
            Watch::Bar(b) => b.show(m),
            Watch::Lines(l) => l.show(m),
        }
    }

    fn progress(&self, p: &Progress) {
        match self {
            Watch::Bar(b) => b.progress(p),
            Watch::Lines(l) => l.progress(p),
        }
    }

    fn finish(&self) {
        if let Watch::Bar(b) = self {
            b.pb.finish_and_clear();
        }
    }
}

/// `--watch` as lines: one per state change and per sample; a poll that brings nothing new
/// prints nothing.
struct Lines {
    started: std::time::Instant,
    /// The state last seen, and the last line printed without its time.
    seen: Mutex<(MigrationState, String)>,
}

impl Lines {
    fn new() -> Lines {
        Lines {
            started: std::time::Instant::now(),
            seen: Mutex::new((MigrationState::Pending, String::new())),
        }
    }

    fn print(&self, state: MigrationState, progress: Option<&Progress>) {
        let line = watch_line(self.started.elapsed(), state, progress);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.0 = state;
        // The time prefix ends at "] "; compare what follows it.
        let body = line.split_once("] ").map_or(line.as_str(), |(_, b)| b);
        if body != seen.1 {
            seen.1 = body.to_string();
            eprintln!("{line}");
        }
    }

    fn show(&self, m: &Migration) {
        let progress = m.progress.as_ref().filter(|_| !m.state.is_terminal());
        self.print(m.state, progress);
    }

    fn progress(&self, p: &Progress) {
        let state = self.seen.lock().unwrap_or_else(|p| p.into_inner()).0;
        self.print(state, Some(p));
    }
}

/// The live bar, and the disks of a block migration drawn under it. The disk lines go through
/// a template key rather than the message, so the bar's own line keeps its shape (elapsed time
/// last) with or without disks.
struct Bar {
    pb: ProgressBar,
    disks: Arc<Mutex<String>>,
}

impl Bar {
    fn new() -> Bar {
        let disks = Arc::new(Mutex::new(String::new()));
        let shown = Arc::clone(&disks);
        let pb = ProgressBar::new(1000);
        pb.set_draw_target(ProgressDrawTarget::stderr());
        pb.set_style(
            ProgressStyle::with_template(
                "{spinner} {prefix:<10} [{bar:30}] {msg} ({elapsed}){disks}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .with_key(
                "disks",
                move |_: &ProgressState, w: &mut dyn std::fmt::Write| {
                    if let Ok(text) = shown.lock() {
                        let _ = w.write_str(&text);
                    }
                },
            )
            .progress_chars("=> "),
        );
        pb.enable_steady_tick(Duration::from_millis(100));
        pb.set_prefix("pending");
        Bar { pb, disks }
    }

    /// Shows one progress sample: position, the line, and the disks under it.
    fn progress(&self, p: &Progress) {
        if let Ok(mut text) = self.disks.lock() {
            *text = output::progress_disks_text(p);
        }
        self.pb
            .set_position((p.percent * 10.0).clamp(0.0, 1000.0) as u64);
        self.pb.set_message(output::progress_message(p));
    }

    /// Updates the bar from a migration object (state changes, and progress when polling).
    fn show(&self, m: &Migration) {
        self.pb.set_prefix(m.state.as_str());
        if let Some(p) = &m.progress {
            self.progress(p);
        }
        if m.state == MigrationState::Completed {
            self.pb.set_position(1000);
        }
    }
}
