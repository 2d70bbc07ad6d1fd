//! A throwaway PostgreSQL for tests: `initdb` into a temporary directory, `pg_ctl` on a free port,
//! run as the `postgres` OS user when the tests run as root; stopped and deleted at the end.
//!
//! [`PgServer::shared`] is one server per test binary (tests take a schema of their own);
//! [`PgServer::start`] is a private one, for tests that stop or kill it.

#![allow(dead_code, unreachable_pub)]

use std::{
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        OnceLock,
    },
    thread,
    time::{Duration, Instant},
};

/// A PostgreSQL server on `127.0.0.1:{port}`, trust authentication, user `postgres`.
pub struct PgServer {
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
    run_as: Option<&'static str>,
}

static SHARED: OnceLock<PgServer> = OnceLock::new();
static SCHEMAS: AtomicU32 = AtomicU32::new(0);

impl PgServer {
    /// The server every test of this binary shares (started on first use, stopped when the test
    /// process exits, by a watchdog that outlives it).
    pub fn shared() -> &'static PgServer {
        SHARED.get_or_init(|| {
            let server = PgServer::start();
            server.stop_when_process_exits();
            server
        })
    }

    /// A fresh schema name, unique within this test binary.
    pub fn schema(prefix: &str) -> String {
        format!(
            "{prefix}_{}_{}",
            std::process::id(),
            SCHEMAS.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Start a private server (stopped and deleted on drop).
    pub fn start() -> PgServer {
        let bin = find_bin()
            .expect("PostgreSQL binaries (initdb, pg_ctl) not found: apt-get install postgresql");
        let run_as = is_root().then_some("postgres");
        let base = std::env::temp_dir().join(format!(
            "tollgate-pg-{}-{}",
            std::process::id(),
            SCHEMAS.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).expect("temp dir");
        let dir = base.join("data");
        if let Some(user) = run_as {
            let status = Command::new("chown")
                .args([&format!("{user}:"), base.to_str().unwrap()])
                .status()
                .expect("chown");
            assert!(status.success(), "chown {base:?}");
        }
        let mut server = PgServer {
            dir,
            port: 0,
            bin,
            run_as,
        };
        let out = server
            .command("initdb")
            .args(["-D", server.dir.to_str().unwrap()])
            .args(["-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"])
            .output()
            .expect("initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for _ in 0..5 {
            server.port = free_port();
            if server.spawn() {
                // Statement counts, for the round-trip tests.
                server.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements");
                return server;
            }
        }
        panic!("could not start PostgreSQL");
    }

    /// `postgres://postgres@127.0.0.1:{port}/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stop the server at once (`pg_ctl stop -m immediate`: connections are cut, like a crash;
    /// committed data is kept).
    pub fn stop(&self) {
        let _ = self
            .command("pg_ctl")
            .args([
                "-D",
                self.dir.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// Start it again on the same port, with the same data.
    pub fn restart(&self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.spawn() {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
        panic!("could not restart PostgreSQL on port {}", self.port);
    }

    /// The postmaster's process id.
    pub fn pid(&self) -> u32 {
        let text =
            std::fs::read_to_string(self.dir.join("postmaster.pid")).expect("postmaster.pid");
        text.lines().next().unwrap().trim().parse().unwrap()
    }

    /// Statements run so far that name `schema` (a counted round trip each: the stores' calls),
    /// leaving out those containing `verify` (the tests' own checks through [`psql`](Self::psql)).
    pub fn statements(&self, schema: &str) -> u64 {
        self.psql(&format!(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements \
             WHERE query LIKE '%\"{schema}\".%' AND query NOT LIKE '%verify%'"
        ))
        .parse()
        .unwrap()
    }

    /// Run SQL through `psql` (for checks that must not go through the code under test).
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-A", "-t", "-q", "-h", "127.0.0.1", "-U", "postgres"])
            .args(["-p", &self.port.to_string(), "-d", "postgres", "-c", sql])
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        match self.run_as {
            Some(user) => {
                let mut command = Command::new("runuser");
                command.args(["-u", user, "--"]).arg(path);
                command
            }
            None => Command::new(path),
        }
    }

    fn spawn(&self) -> bool {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
             -c full_page_writes=off -c max_connections=200 \
             -c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=top",
            self.port,
            self.dir.parent().unwrap().to_str().unwrap()
        );
        let log = self.dir.parent().unwrap().join("server.log");
        let status = self
            .command("pg_ctl")
            .args(["-D", self.dir.to_str().unwrap(), "-o", &options])
            .args(["-l", log.to_str().unwrap(), "-w", "-t", "20", "start"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            return false;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// A watchdog shell that waits for this process to exit, then stops the server and deletes
    /// its directory (statics are never dropped).
    fn stop_when_process_exits(&self) {
        let base = self.dir.parent().unwrap();
        let pg_ctl = self.bin.join("pg_ctl");
        let stop = match self.run_as {
            Some(user) => format!(
                "runuser -u {user} -- {} -D {} -m immediate stop",
                pg_ctl.display(),
                self.dir.display()
            ),
            None => format!(
                "{} -D {} -m immediate stop",
                pg_ctl.display(),
                self.dir.display()
            ),
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {stop} >/dev/null 2>&1; rm -rf {base}",
            pid = std::process::id(),
            base = base.display(),
        );
        // Never waited for: it is meant to outlive this process.
        #[allow(clippy::zombie_processes)]
        Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("watchdog");
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(self.dir.parent().unwrap());
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The directory of `initdb` and `pg_ctl`: on `PATH`, else the newest `/usr/lib/postgresql/*/bin`.
fn find_bin() -> Option<PathBuf> {
    if let Ok(out) = Command::new("sh")
        .args(["-c", "command -v initdb"])
        .output()
    {
        let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if out.status.success() && !path.is_empty() {
            // A symlink (`/usr/local/bin/initdb`) leads to the directory of all the binaries.
            let path = std::fs::canonicalize(&path).unwrap_or_else(|_| PathBuf::from(&path));
            return path.parent().map(Path::to_path_buf);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}
