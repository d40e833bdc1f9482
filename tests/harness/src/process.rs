//! A server process a test starts and owns: [`Daemon`].
//!
//! Each daemon runs under a small shell that kills it when the test process's end of its
//! stdin pipe closes, so servers shared by a whole test binary (in statics, never dropped)
//! do not outlive it, even when the test binary itself is killed.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Daemon {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    shell: Option<Child>,
    stdin: Option<ChildStdin>,
    pid: u32,
}

impl Daemon {
    /// Starts `program args`, its stdout and stderr appended to `log`. Panics, naming the
    /// program, when it cannot be started.
    pub fn spawn(name: &str, program: impl AsRef<Path>, args: &[String], log: impl AsRef<Path>) -> Self {
        Self::spawn_with_env(name, program, args, &[], log)
    }

    /// [`Daemon::spawn`] with these environment variables added.
    pub fn spawn_with_env(
        name: &str,
        program: impl AsRef<Path>,
        args: &[String],
        env: &[(&str, &str)],
        log: impl AsRef<Path>,
    ) -> Self {
        let mut daemon = Daemon {
            name: name.to_string(),
            program: program.as_ref().to_path_buf(),
            args: args.to_vec(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            log: log.as_ref().to_path_buf(),
            shell: None,
            stdin: None,
            pid: 0,
        };
        daemon.start();
        daemon
    }

    fn start(&mut self) {
        let script = r#"prog=$1; log=$2; shift 2; "$prog" "$@" >>"$log" 2>&1 & pid=$!; echo $pid; read _; kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null"#;
        let mut shell = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(&self.program)
            .arg(&self.log)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start a shell for {}: {e}", self.name));
        let mut line = String::new();
        BufReader::new(shell.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("{} did not start: {e}", self.name));
        self.pid = line.trim().parse().unwrap_or_else(|_| panic!("{} did not start: {line:?}", self.name));
        self.stdin = shell.stdin.take();
        self.shell = Some(shell);
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// True while the process runs (a stopped process counts as running).
    pub fn is_running(&self) -> bool {
        self.pid != 0 && Path::new(&format!("/proc/{}", self.pid)).exists() && !self.is_zombie()
    }

    fn is_zombie(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .map(|stat| stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')))
            .unwrap_or(true)
    }

    /// Everything the process has written so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Why a start failed: the daemon's name, whether it still runs, and the end of its log.
    pub fn report(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let state = if self.is_running() { "running" } else { "exited" };
        format!(
            "{} ({state}); last lines of {}:\n{}",
            self.name,
            self.log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }

    /// Kills the process at once (SIGKILL), as a crash would, and waits for it to go.
    pub fn kill(&mut self) {
        self.signal("KILL");
        drop(self.stdin.take());
        if let Some(mut shell) = self.shell.take() {
            let _ = shell.wait();
        }
        self.pid = 0;
    }

    /// Starts the same command again (after [`Daemon::kill`]).
    pub fn restart(&mut self) {
        self.kill();
        self.start();
    }

    /// Sends a signal by name (`STOP`, `CONT`, `TERM`, `KILL`).
    pub fn signal(&self, sig: &str) {
        if self.pid != 0 {
            let _ = Command::new("kill").arg(format!("-{sig}")).arg(self.pid.to_string()).status();
        }
    }

    /// Freezes the process (SIGSTOP) and waits until it is stopped: a signal is delivered
    /// asynchronously, and a process still running would answer one more request.
    pub fn pause(&self) {
        self.signal("STOP");
        wait_stopped(&[self.pid]);
    }

    pub fn resume(&self) {
        self.signal("CONT");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.signal("CONT");
        self.kill();
    }
}

/// What `/proc/PID/stat` says of a process.
pub(crate) struct ProcessStat {
    /// `R` running, `S` sleeping, `T` stopped, `Z` zombie (exited, holding nothing), …
    pub(crate) state: char,
    pub(crate) parent: u32,
}

pub(crate) fn process(pid: u32) -> Option<ProcessStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (in parentheses) may hold spaces: fields are counted after the last ')'.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.chars().next()?;
    Some(ProcessStat { state, parent: fields.next()?.parse().ok()? })
}

/// Waits until every process in `pids` is stopped or gone (after a SIGSTOP).
pub(crate) fn wait_stopped(pids: &[u32]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let running =
        || pids.iter().copied().filter(|&pid| process(pid).is_some_and(|p| !"TtZ".contains(p.state)));
    while running().next().is_some() {
        let left: Vec<u32> = running().collect();
        assert!(Instant::now() < deadline, "processes {left:?} still run 5s after SIGSTOP");
        std::thread::sleep(Duration::from_millis(1));
    }
}
