//! The PostgreSQL server the tests run against: one real cluster per test run (Debian's
//! `postgresql` package), started lazily the first time a PostgreSQL-backed test needs it,
//! and one database per test on it.
//!
//! The cluster lives in a fresh temp dir: `initdb` (as the `postgres` user when the tests
//! run as root, since initdb refuses root), a Unix socket in that dir and no TCP
//! (`listen_addresses = ''`), `fsync`, `synchronous_commit` and `full_page_writes` off, and
//! enough connections for the parallel tests. The superuser `postgres` gets in without a
//! password (`trust`); the role [`SECRET_ROLE`] only with its password (`scram-sha-256`),
//! so tests can check that a password never leaks. The server's `timezone` is not UTC, so
//! a backend that leans on the server's zone instead of writing UTC fails here first.
//!
//! A cluster never outlives the test process, even when a test panics or the process is
//! killed: a watchdog (`sh`, in its own process group, started before `initdb`) polls the
//! test process every 0.5 s and then stops the server (`pg_ctl stop -m immediate`) and
//! removes the dir.
//!
//! A second cluster, for the tests that move the clock ([`clock_cluster`]), runs with
//! libfaketime preloaded: its `now()` follows a file the test writes ([`Cluster::set_clock`],
//! libfaketime's spec: `+10d`, `2030-01-01 00:00:00`).
//!
//! # The URL
//! Both libpq (`psql`) and the Rust `postgres` crate (0.19) take a Unix-socket host as a
//! query parameter, which keeps the URL free of `user@` (orchctl passes `ORCH_*` URLs on to
//! agents with any `user:password@` removed):
//!
//! ```text
//! postgresql:///DBNAME?host=/tmp/orchctl-pg-XXXX&user=postgres
//! postgresql://orch_secret:PASSWORD@/DBNAME?host=/tmp/orchctl-pg-XXXX
//! ```
//!
//! (`postgresql://postgres@%2Ftmp%2Forchctl-pg-XXXX/DBNAME` works in both too.)
//!
//! Never skips: without PostgreSQL's binaries a PostgreSQL-backed test panics naming the
//! Debian package.

#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// The role that needs a password (scram-sha-256).
pub const SECRET_ROLE: &str = "orch_secret";
/// Its password: distinctive, so a leak is easy to find in any output.
pub const SECRET_PASSWORD: &str = "pg-Harness-s3cret-7f3a9c";

/// libfaketime, from Debian's package `libfaketime` (a dependency of `faketime`).
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

static MAIN: OnceLock<Result<Cluster, String>> = OnceLock::new();
static CLOCK: OnceLock<Result<Cluster, String>> = OnceLock::new();
static DATABASES: AtomicUsize = AtomicUsize::new(0);

/// The run's cluster, started on first use.
pub fn cluster() -> &'static Cluster {
    match MAIN.get_or_init(|| Cluster::start(false)) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

/// The run's clock cluster (libfaketime preloaded), started on first use.
pub fn clock_cluster() -> &'static Cluster {
    match CLOCK.get_or_init(|| Cluster::start(true)) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

/// The folder with `initdb`, `pg_ctl`, `postgres` and `psql`: the highest version under
/// /usr/lib/postgresql, else the one on `PATH`.
pub fn bin_dir() -> Result<PathBuf, String> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let v = e.file_name().to_str()?.parse::<u32>().ok()?;
                    let bin = e.path().join("bin");
                    bin.join("initdb").is_file().then_some((v, bin))
                })
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        if ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|b| dir.join(b).is_file())
        {
            return Ok(dir);
        }
    }
    Err(
        "PostgreSQL's server binaries are missing (no /usr/lib/postgresql/<version>/bin/initdb, \
         no initdb on PATH): the PostgreSQL tests need Debian's package `postgresql` — \
         apt-get install postgresql (.ci/run and scripts/test install it)"
            .into(),
    )
}

/// Who runs the server: as root, the `postgres` user (initdb refuses root).
#[derive(Clone)]
struct RunAs {
    /// The command prefix (`runuser -u postgres --`), empty when not root.
    prefix: Vec<String>,
    uid_gid: Option<(u32, u32)>,
}

impl RunAs {
    fn detect() -> Result<RunAs, String> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(RunAs {
                prefix: Vec::new(),
                uid_gid: None,
            });
        }
        let user = nix::unistd::User::from_name("postgres")
            .ok()
            .flatten()
            .ok_or(
                "the tests run as root, so the PostgreSQL cluster runs as the user `postgres`, \
                 which does not exist: apt-get install postgresql creates it",
            )?;
        let prefix = if which("runuser") {
            vec![
                "runuser".into(),
                "-u".into(),
                "postgres".into(),
                "--".into(),
            ]
        } else if which("setpriv") {
            vec![
                "setpriv".into(),
                format!("--reuid={}", user.uid),
                format!("--regid={}", user.gid),
                "--init-groups".into(),
                "--".into(),
            ]
        } else {
            return Err("as root the cluster is started through runuser or setpriv \
                        (Debian's util-linux), and neither is installed"
                .into());
        };
        Ok(RunAs {
            prefix,
            uid_gid: Some((user.uid.as_raw(), user.gid.as_raw())),
        })
    }

    fn command(&self, program: &Path) -> Command {
        let mut c = match self.prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program);
                c
            }
            None => Command::new(program),
        };
        c.env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("TZ", "UTC")
            .env("LC_ALL", "C")
            .stdin(Stdio::null());
        c
    }

    fn shell_prefix(&self) -> String {
        self.prefix
            .iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn which(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Percent-encodes what a URL query value must not hold raw.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One running cluster.
pub struct Cluster {
    /// The temp dir: `data/`, the socket, `server.log`, the clock file.
    pub dir: PathBuf,
    pub bin: PathBuf,
    /// The libfaketime spec file of a clock cluster.
    clock: Option<PathBuf>,
    run_as: RunAs,
    /// The watchdog's pid (for the harness's own test of it).
    pub watchdog: u32,
    /// `server_version_num`, once the server runs.
    version: OnceLock<i64>,
}

impl Cluster {
    fn start(clocked: bool) -> Result<Cluster, String> {
        let bin = bin_dir()?;
        let run_as = RunAs::detect()?;
        if clocked && !Path::new(LIBFAKETIME).is_file() {
            return Err(format!(
                "the clock tests on PostgreSQL preload libfaketime into the server, and \
                 {LIBFAKETIME} is missing: apt-get install faketime (.ci/run installs it)"
            ));
        }
        let dir = tempfile::Builder::new()
            .prefix(if clocked {
                "orchctl-pg-clock-"
            } else {
                "orchctl-pg-"
            })
            .tempdir()
            .map_err(|e| format!("creating the cluster's temp dir: {e}"))?
            .keep();
        // Others (the postgres user, a test's unprivileged orchctl) reach the socket.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| e.to_string())?;
        let watchdog = spawn_watchdog(&dir, &bin, &run_as)?;
        let cluster = Cluster {
            clock: clocked.then(|| dir.join("clock")),
            dir,
            bin,
            run_as,
            watchdog,
            version: OnceLock::new(),
        };
        cluster.init()?;
        Ok(cluster)
    }

    fn init(&self) -> Result<(), String> {
        if let Some((uid, gid)) = self.run_as.uid_gid {
            std::os::unix::fs::chown(&self.dir, Some(uid), Some(gid))
                .map_err(|e| format!("chown {}: {e}", self.dir.display()))?;
        }
        let data = self.dir.join("data");
        self.run(
            self.run_as
                .command(&self.bin.join("initdb"))
                .arg("-D")
                .arg(&data)
                .args([
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ]),
            "initdb",
        )?;
        let conf = format!(
            "\n# orchctl's test harness (tests/common/pg.rs)\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             listen_addresses = ''\n\
             unix_socket_directories = '{}'\n\
             max_connections = 300\n\
             shared_buffers = 64MB\n\
             timezone = 'Asia/Kolkata'\n\
             log_timezone = 'UTC'\n",
            self.dir.display()
        );
        append(&data.join("postgresql.conf"), &conf)?;
        // The first matching line wins: the password role before the trust line.
        std::fs::write(
            data.join("pg_hba.conf"),
            format!("local all {SECRET_ROLE} scram-sha-256\nlocal all all trust\n"),
        )
        .map_err(|e| e.to_string())?;

        // `env` sets the variables after runuser/setpriv, which would not pass them on.
        let mut start = self.run_as.command(Path::new("/usr/bin/env"));
        if let Some(clock) = &self.clock {
            self.set_clock("+0");
            start
                .arg(format!("LD_PRELOAD={LIBFAKETIME}"))
                .arg(format!("FAKETIME_TIMESTAMP_FILE={}", clock.display()))
                .arg("FAKETIME_NO_CACHE=1")
                // Only the wall clock moves: the server's waits and timeouts keep real time.
                .arg("FAKETIME_DONT_FAKE_MONOTONIC=1");
        }
        start.arg(self.bin.join("pg_ctl"));
        self.run(
            start
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(self.dir.join("server.log"))
                .args(["-w", "-t", "60", "start"]),
            "pg_ctl start",
        )?;
        let mut admin = self.admin()?;
        admin
            .batch_execute(&format!(
                "CREATE ROLE {SECRET_ROLE} LOGIN SUPERUSER PASSWORD '{SECRET_PASSWORD}'"
            ))
            .map_err(|e| format!("creating the password role: {e:#}"))?;
        let version: String = admin
            .query_one("SHOW server_version_num", &[])
            .map_err(|e| format!("reading the server's version: {e:#}"))?
            .get(0);
        let _ = self.version.set(version.parse().unwrap_or(0));
        Ok(())
    }

    /// Runs a setup command, its output to a file in the dir (never a pipe the server
    /// could keep open); the error carries that output and the server log.
    fn run(&self, cmd: &mut Command, what: &str) -> Result<(), String> {
        let out_path = self.dir.join(format!("{}.out", what.replace(' ', "-")));
        let out = std::fs::File::create(&out_path).map_err(|e| e.to_string())?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        if let Some((uid, gid)) = self.run_as.uid_gid {
            let _ = std::os::unix::fs::chown(&out_path, Some(uid), Some(gid));
        }
        let status = cmd
            .stdout(out)
            .stderr(err)
            .status()
            .map_err(|e| format!("{what}: cannot run {cmd:?}: {e}"))?;
        if status.success() {
            return Ok(());
        }
        Err(format!(
            "{what} failed ({status}) for the test cluster in {}:\n{}\n{}",
            self.dir.display(),
            std::fs::read_to_string(&out_path).unwrap_or_default(),
            std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
        ))
    }

    /// The superuser's URL for database `db`.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgresql:///{db}?host={}&user=postgres",
            url_encode(&self.dir.to_string_lossy())
        )
    }

    /// The password role's URL for database `db`, the password in it.
    pub fn password_url(&self, db: &str) -> String {
        format!(
            "postgresql://{SECRET_ROLE}:{SECRET_PASSWORD}@/{db}?host={}",
            url_encode(&self.dir.to_string_lossy())
        )
    }

    /// The password role's URL for database `db` without the password (for
    /// `ORCH_DB_PASSWORD`, or to see the server refuse it).
    pub fn password_role_url(&self, db: &str) -> String {
        format!(
            "postgresql:///{db}?host={}&user={SECRET_ROLE}",
            url_encode(&self.dir.to_string_lossy())
        )
    }

    fn admin(&self) -> Result<postgres::Client, String> {
        postgres::Client::connect(&self.url("postgres"), postgres::NoTls).map_err(|e| {
            format!(
                "connecting to the test cluster in {}: {e:#}",
                self.dir.display()
            )
        })
    }

    /// A fresh, empty database on this cluster, named after the calling test; dropped
    /// (connections and all) with the returned handle.
    pub fn create_database(&'static self) -> PgDatabase {
        let n = DATABASES.fetch_add(1, Ordering::SeqCst);
        let hint: String = std::thread::current()
            .name()
            .unwrap_or("test")
            .rsplit("::")
            .next()
            .unwrap_or("test")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect();
        let mut name = format!("t{n}_{hint}");
        name.truncate(63);
        // Copying template1's files is several times faster than the WAL-logged copy that
        // PostgreSQL 15 made the default, and durability means nothing here.
        let strategy = if self.version.get().is_some_and(|v| *v >= 150_000) {
            " STRATEGY = FILE_COPY"
        } else {
            ""
        };
        let mut admin = self.admin().unwrap_or_else(|e| panic!("{e}"));
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\"{strategy}"))
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e:#}"));
        PgDatabase {
            cluster: self,
            name,
        }
    }

    /// Moves this clock cluster's wall clock (libfaketime's spec: `+0`, `+10d`, `-2h`, or
    /// an absolute `2030-01-01 00:00:00` that stops it there). Written by a rename, so the
    /// server never reads half a spec.
    pub fn set_clock(&self, spec: &str) {
        let clock = self
            .clock
            .as_ref()
            .expect("set_clock is for the clock cluster");
        let tmp = clock.with_extension("new");
        std::fs::write(&tmp, format!("{spec}\n")).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::rename(&tmp, clock).unwrap();
    }

    pub fn is_clocked(&self) -> bool {
        self.clock.is_some()
    }

    /// The postmaster's pid (first line of `postmaster.pid`).
    pub fn postmaster_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.join("data/postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }
}

fn append(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Starts the watchdog of a cluster in `dir`: once this process is gone it stops the
/// server at once and removes the dir. In its own process group with no terminal and no
/// inherited pipe, so neither a ^C to the test run nor a reader of the tests' output waits
/// for it.
fn spawn_watchdog(dir: &Path, bin: &Path, run_as: &RunAs) -> Result<u32, String> {
    let dir_q = shell_quote(&dir.to_string_lossy());
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done\n\
         if [ -f {dir_q}/data/postmaster.pid ]; then\n  \
           {prefix} {pg_ctl} -D {dir_q}/data -m immediate -w -t 30 stop >/dev/null 2>&1\n\
         fi\n\
         rm -rf {dir_q}\n",
        pid = std::process::id(),
        prefix = run_as.shell_prefix(),
        pg_ctl = shell_quote(&bin.join("pg_ctl").to_string_lossy()),
    );
    let child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("starting the cluster's watchdog: {e}"))?;
    Ok(child.id())
}

/// One test's database; dropped (`DROP DATABASE … WITH (FORCE)`) with this handle.
pub struct PgDatabase {
    pub cluster: &'static Cluster,
    pub name: String,
}

impl PgDatabase {
    pub fn url(&self) -> String {
        self.cluster.url(&self.name)
    }

    pub fn password_url(&self) -> String {
        self.cluster.password_url(&self.name)
    }

    pub fn password_role_url(&self) -> String {
        self.cluster.password_role_url(&self.name)
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        if let Ok(mut admin) = self.cluster.admin() {
            let _ = admin.batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ));
        }
    }
}
