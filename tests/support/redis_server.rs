//! A throwaway `redis-server` for tests: a free port, no persistence, killed on drop.

#![allow(dead_code, unreachable_pub)]

use std::{
    net::{TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

/// A `redis-server` child process on `127.0.0.1:{port}`.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
}

impl RedisServer {
    /// Start a server on a free port (the binary must be on `PATH`).
    pub fn start() -> RedisServer {
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let mut server = RedisServer { child: None, port };
            if server.spawn() {
                return server;
            }
        }
        panic!("could not start redis-server (is it on PATH?)");
    }

    /// The URL clients connect to.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Script and function calls (`EVALSHA`, `FCALL`) the server has run so far: one round
    /// trip each.
    pub async fn script_calls(&self) -> u64 {
        self.calls(&["evalsha", "evalsha_ro", "fcall", "fcall_ro"])
            .await
    }

    /// Calls of `commands` (lower case, as `INFO commandstats` names them; those run inside
    /// scripts too) since the server started or its stats were reset.
    pub async fn calls(&self, commands: &[&str]) -> u64 {
        let client = redis::Client::open(self.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await
            .unwrap();
        info.lines()
            .filter_map(|line| {
                let rest = commands
                    .iter()
                    .find_map(|name| line.strip_prefix(&format!("cmdstat_{name}:")))?;
                rest.split(',')
                    .next()?
                    .strip_prefix("calls=")?
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    }

    /// `CONFIG RESETSTAT`: the command counts start again from 0.
    pub async fn reset_stats(&self) {
        let client = redis::Client::open(self.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut conn)
            .await
            .unwrap();
    }

    /// Waits until `account` has no credits held (settlements run after a response's body
    /// ends), reading with a plain command so that no script is counted.
    pub async fn wait_settled(&self, account: &str) {
        let client = redis::Client::open(self.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        for _ in 0..500 {
            let held: Option<String> = redis::cmd("HGET")
                .arg(format!("tollgate:{{acct:{account}}}"))
                .arg("held")
                .query_async(&mut conn)
                .await
                .unwrap();
            if held.as_deref() == Some("0") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("credits of {account} still held after 5 s");
    }

    /// Kill the server (its data is gone: nothing is persisted).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start the server again on the same port, empty.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.spawn() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        panic!("could not restart redis-server on port {}", self.port);
    }

    fn spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(mut child) = child else { return false };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return false; // exited: the port was taken
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                self.child = Some(child);
                return true;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl RedisServer {
    /// Freeze the server (SIGSTOP): connections stay open, nothing answers, data is kept.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Unfreeze it (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }
}
