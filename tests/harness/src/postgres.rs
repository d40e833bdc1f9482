//! Private PostgreSQL servers from the Debian `postgresql` package's binaries: `initdb` makes
//! a throwaway cluster in a temp dir and `postgres` serves it on a free loopback port, with
//! fsync off and trust authentication (nothing here is worth a password or a disk flush).
//!
//! PostgreSQL refuses to run as root, so a test running as root runs `initdb` and `postgres`
//! as the `postgres` system user (`setpriv`), in a temp dir that user owns.
//!
//! The postmaster is a [`Daemon`], killed when the test binary exits; its backends notice
//! that and exit by themselves. [`PostgresServer::pause`] also stops the backends, and a
//! backend that is stopped notices nothing, so each pause leaves a small guard behind that
//! wakes them if the postmaster dies before [`PostgresServer::resume`].
//!
//! The flags and why each is set are in `docs/testing.md`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::{
    free_port,
    process::{Daemon, process, wait_stopped},
    require_program,
};

/// The superuser `initdb` creates (`--username`), whatever the OS user is.
pub const POSTGRES_USER: &str = "postgres";
/// The database created for the tests on first start.
pub const POSTGRES_DATABASE: &str = "breakwater";
/// The system user the servers run as when the test runs as root (the Debian package's).
const SYSTEM_USER: &str = "postgres";
/// Temp dirs are named `breakwater-postgres-<pid>-…`, so later test processes can remove
/// those of exited ones (a shared server lives in a static and is never dropped, and an
/// initdb'd cluster is some 40 MB).
const DIR_PREFIX: &str = "breakwater-postgres-";

#[derive(Debug)]
pub struct PostgresServer {
    pub port: u16,
    bin: &'static PostgresBinaries,
    dir: PathBuf,
    daemon: Daemon,
    // Holds the cluster's directory until the server is dropped; dropped after the daemon.
    _dir: tempfile::TempDir,
}

/// Where the programs of one PostgreSQL installation are.
#[derive(Debug)]
struct PostgresBinaries {
    initdb: PathBuf,
    postgres: PathBuf,
    psql: PathBuf,
    pg_isready: PathBuf,
}

impl PostgresServer {
    /// The server this test binary shares: started on first use, killed when the binary
    /// exits. Tests sharing it keep to their own tables, or their own database
    /// ([`PostgresServer::create_database`]), and never pause it.
    pub fn shared() -> &'static PostgresServer {
        static SHARED: OnceLock<PostgresServer> = OnceLock::new();
        SHARED.get_or_init(PostgresServer::start)
    }

    /// A private server on a free port, with database [`POSTGRES_DATABASE`] created.
    pub fn start() -> Self {
        let bin = PostgresBinaries::find();
        remove_dirs_of_exited_processes();
        let temp = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
            .tempdir()
            .expect("temp dir for postgres");
        let dir = temp.path().to_path_buf();
        if running_as_root() {
            require_program("setpriv", "util-linux");
            give_to_system_user(&dir);
        }
        let data = dir.join("data").display().to_string();

        // --no-sync: the cluster is thrown away, so initdb need not wait for the disk;
        // --no-locale with UTF8: the same collation on every machine, whatever locales exist.
        let (program, args) = as_owner(
            &bin.initdb,
            &[
                "-D",
                &data,
                "--username",
                POSTGRES_USER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ],
        );
        let out = Command::new(&program)
            .args(&args)
            .current_dir(&dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
        assert!(
            out.status.success(),
            "initdb failed ({}):\n{}{}",
            bin.initdb.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );

        let port = free_port();
        let (program, args) = as_owner(
            &bin.postgres,
            &[
                "-D",
                &data,
                "-p",
                &port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                &format!("unix_socket_directories={}", dir.display()),
                "-c",
                "fsync=off",
            ],
        );
        let daemon = Daemon::spawn("postgres", program, &args, dir.join("postgres.log"));
        let server = PostgresServer { port, bin, dir, daemon, _dir: temp };
        server.wait_ready();
        server.psql_in("postgres", &format!("CREATE DATABASE {POSTGRES_DATABASE}"));
        server
    }

    /// `postgres://postgres@127.0.0.1:PORT/breakwater`: the superuser, no password (trust).
    pub fn url(&self) -> String {
        self.url_for(POSTGRES_DATABASE)
    }

    /// The URL of another database on this server.
    pub fn url_for(&self, database: &str) -> String {
        format!("postgres://{POSTGRES_USER}@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates database `name` (a plain identifier) and returns its URL: a test's own
    /// database on a shared server.
    pub fn create_database(&self, name: &str) -> String {
        self.psql_in("postgres", &format!("CREATE DATABASE \"{name}\""));
        self.url_for(name)
    }

    /// Runs `sql` (one or more statements) in [`POSTGRES_DATABASE`] with psql and returns
    /// what it printed: rows one a line, columns separated by `|`, no headers. Fails the
    /// test with psql's stderr when a statement fails.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_in(POSTGRES_DATABASE, sql)
    }

    /// [`PostgresServer::psql`] in another database.
    pub fn psql_in(&self, database: &str, sql: &str) -> String {
        use std::io::Write;
        let port = self.port.to_string();
        // Statements come on stdin, so each runs and prints on its own; -X: a developer's
        // ~/.psqlrc must not change the output; ON_ERROR_STOP: the first error fails psql.
        let mut child = Command::new(&self.bin.psql)
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", &port])
            .args(["-U", POSTGRES_USER, "-d", database, "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.psql.display()));
        let mut stdin = child.stdin.take().expect("psql stdin");
        stdin.write_all(sql.as_bytes()).expect("write SQL to psql");
        drop(stdin);
        let out = child.wait_with_output().expect("psql output");
        assert!(
            out.status.success(),
            "psql on port {} failed for {sql:?}: {}",
            self.port,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until the server accepts connections (after a crash, once recovery is done).
    fn wait_ready(&self) {
        let within = Duration::from_secs(30);
        let deadline = Instant::now() + within;
        let port = self.port.to_string();
        let mut last = String::new();
        while Instant::now() < deadline {
            let out = Command::new(&self.bin.pg_isready)
                .args(["-h", "127.0.0.1", "-p", &port, "-U", POSTGRES_USER, "-d", "postgres", "-t", "1"])
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.pg_isready.display()));
            if out.status.success() {
                return;
            }
            last = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if !self.daemon.is_running() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "postgres on port {} was not ready within {within:?} (pg_isready: {last}): {}",
            self.port,
            self.daemon.report()
        );
    }

    /// The postmaster's live child processes (backends and background workers; an exited
    /// one stays a zombie until the postmaster, perhaps stopped, reaps it).
    fn backends(&self) -> Vec<u32> {
        let postmaster = self.daemon.pid();
        if postmaster == 0 {
            return Vec::new();
        }
        let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
        entries
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| process(pid).is_some_and(|p| p.parent == postmaster && p.state != 'Z'))
            .collect()
    }

    /// Kills the postmaster and every backend at once (SIGKILL), as a crash of the whole
    /// server would, and waits until they are gone. What was committed survives: the WAL was
    /// written to the OS before each commit returned, fsync or not.
    pub fn kill(&mut self) {
        // Stopped first, so the postmaster forks no backend between the listing and the kill.
        self.stop_postmaster();
        let backends = self.backends();
        let _ = std::fs::remove_file(self.dir.join("paused"));
        self.daemon.kill();
        signal(&backends, "KILL");
        // A new postmaster refuses to start while an old backend still holds the shared memory.
        let deadline = Instant::now() + Duration::from_secs(10);
        while backends.iter().any(|&pid| process(pid).is_some_and(|p| p.state != 'Z')) {
            assert!(Instant::now() < deadline, "postgres backends {backends:?} still run 10s after SIGKILL");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Starts the server again on the same port and data directory (after [`Self::kill`], or
    /// killing it first), and waits until recovery is done and it accepts connections.
    pub fn restart(&mut self) {
        self.kill();
        self.daemon.restart();
        self.wait_ready();
    }

    /// Freezes the whole server (SIGSTOP to the postmaster, then to every backend): open
    /// connections stay open and nothing is answered; new connections are accepted by the
    /// kernel but never greeted. Only for a private server: the shared one serves others.
    pub fn pause(&self) {
        self.stop_postmaster();
        let backends = self.backends();
        signal(&backends, "STOP");
        wait_stopped(&backends);
        // Stopped backends would never see the postmaster die with the test binary: a guard,
        // outside this process, waits while the marker exists and the postmaster lives, and
        // then wakes them (they exit by themselves once the postmaster is gone).
        let marker = self.dir.join("paused");
        std::fs::write(&marker, "").unwrap_or_else(|e| panic!("cannot write {}: {e}", marker.display()));
        let guard = r#"marker=$1; postmaster=$2; shift 2
            ( while [ -e "$marker" ] && kill -0 "$postmaster" 2>/dev/null; do sleep 0.2; done
              kill -CONT "$@" 2>/dev/null ) &"#;
        // The shell exits at once; the guard is left to init, so nothing here has to reap it.
        let _ = Command::new("sh")
            .args(["-c", guard, "sh"])
            .arg(&marker)
            .arg(self.daemon.pid().to_string())
            .args(backends.iter().map(u32::to_string))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// SIGSTOPs the postmaster and waits until it is stopped: a signal is delivered
    /// asynchronously, and a postmaster still running could fork one more backend.
    fn stop_postmaster(&self) {
        self.daemon.pause();
    }

    /// Wakes a server frozen by [`PostgresServer::pause`]: the backends, then the postmaster.
    pub fn resume(&self) {
        let _ = std::fs::remove_file(self.dir.join("paused"));
        signal(&self.backends(), "CONT");
        self.daemon.signal("CONT");
    }

    /// The postmaster's and the backends' process ids (for tests of the harness itself).
    pub fn pids(&self) -> Vec<u32> {
        std::iter::once(self.daemon.pid()).chain(self.backends()).collect()
    }

    /// Everything the server has logged so far.
    pub fn log(&self) -> String {
        self.daemon.log()
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.kill();
    }
}

impl PostgresBinaries {
    /// initdb and postgres from `initdb` on PATH, else from the newest
    /// `/usr/lib/postgresql/VERSION/bin` (Debian keeps the server's programs off PATH); psql
    /// and pg_isready of the same installation (or from PATH). Fails the test naming the
    /// Debian package when there is none.
    fn find() -> &'static PostgresBinaries {
        static FOUND: OnceLock<PostgresBinaries> = OnceLock::new();
        FOUND.get_or_init(|| {
            let on_path = std::env::var_os("PATH").and_then(|path| {
                std::env::split_paths(&path).map(|dir| dir.join("initdb")).find(|initdb| initdb.is_file())
            });
            // initdb runs the postgres next to its real path, so a symlink is followed.
            let dir = on_path
                .and_then(|initdb| Some(initdb.canonicalize().ok()?.parent()?.to_path_buf()))
                .or_else(newest_debian_bin_dir)
                .unwrap_or_else(|| {
                    panic!(
                        "PostgreSQL's initdb is not on PATH nor in /usr/lib/postgresql/*/bin: `make deps` \
                         installs it (as root, with apt), or run `apt-get install postgresql`"
                    )
                });
            let client = |name: &str| {
                let path = dir.join(name);
                if path.is_file() {
                    path
                } else {
                    require_program(name, "postgresql-client");
                    PathBuf::from(name)
                }
            };
            PostgresBinaries {
                initdb: dir.join("initdb"),
                postgres: dir.join("postgres"),
                psql: client("psql"),
                pg_isready: client("pg_isready"),
            }
        })
    }
}

/// `/usr/lib/postgresql/VERSION/bin` of the highest VERSION (numerically: 9.6 < 10 < 15)
/// that has initdb.
fn newest_debian_bin_dir() -> Option<PathBuf> {
    let version =
        |name: &str| -> Vec<u32> { name.split('.').map(|part| part.parse().unwrap_or(0)).collect() };
    std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter(|entry| entry.path().join("bin/initdb").is_file())
        .max_by_key(|entry| version(&entry.file_name().to_string_lossy()))
        .map(|entry| entry.path().join("bin"))
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|proc| proc.uid() == 0)
}

/// `program args`, run as the `postgres` system user when this process is root.
fn as_owner(program: &Path, args: &[&str]) -> (PathBuf, Vec<String>) {
    let args = args.iter().map(|arg| arg.to_string());
    if !running_as_root() {
        return (program.to_path_buf(), args.collect());
    }
    // setpriv execs the program (runuser would stay as its parent), so the daemon's pid is
    // the postmaster's own.
    let user = [format!("--reuid={SYSTEM_USER}"), format!("--regid={SYSTEM_USER}"), "--init-groups".into()];
    let argv = user.into_iter().chain(std::iter::once(program.display().to_string())).chain(args);
    (PathBuf::from("setpriv"), argv.collect())
}

/// Hands `dir` to the `postgres` system user (initdb wants to own the data directory).
fn give_to_system_user(dir: &Path) {
    let id = |flag: &str| -> u32 {
        let out = Command::new("id").args([flag, SYSTEM_USER]).output().expect("run id");
        assert!(
            out.status.success(),
            "tests run as root start PostgreSQL as the `{SYSTEM_USER}` user, which does not exist: \
             the Debian package `postgresql` creates it"
        );
        let text = String::from_utf8_lossy(&out.stdout);
        text.trim().parse().unwrap_or_else(|_| panic!("id {flag} {SYSTEM_USER} printed {text:?}"))
    };
    std::os::unix::fs::chown(dir, Some(id("-u")), Some(id("-g")))
        .unwrap_or_else(|e| panic!("cannot give {} to {SYSTEM_USER}: {e}", dir.display()));
}

/// Removes the temp dirs of test processes that have exited (once per process).
fn remove_dirs_of_exited_processes() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
        for entry in entries.flatten() {
            let exited = entry
                .file_name()
                .to_str()
                .and_then(|name| name.strip_prefix(DIR_PREFIX)?.split('-').next()?.parse::<u32>().ok())
                .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
            if exited {
                // Another user's directory may not be ours to remove; it is left alone.
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    });
}

/// Sends signal `sig` (`STOP`, `CONT`, `KILL`) to every process in `pids`.
fn signal(pids: &[u32], sig: &str) {
    if !pids.is_empty() {
        let _ = Command::new("kill").arg(format!("-{sig}")).args(pids.iter().map(u32::to_string)).status();
    }
}
