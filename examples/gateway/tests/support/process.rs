//! The gateway binary as a child process serving a config from a directory of its own, for
//! the tests that need the real process (SIGTERM, `kill -9`, restarts on the same storage).

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

/// A running `gateway --config gateway.toml` in its directory; killed on drop.
pub struct Process {
    child: Child,
    /// Where it listens (the config's `listen` must be `127.0.0.1:0`).
    pub addr: SocketAddr,
    /// Its stdout lines after the first (the banner, `tollgate gateway stopped`).
    lines: mpsc::Receiver<String>,
}

impl Process {
    /// Write `config` to `dir/gateway.toml` and start the binary there (relative storage
    /// paths land in `dir`).
    pub fn start(dir: &Path, config: &str) -> Process {
        std::fs::write(dir.join("gateway.toml"), config).unwrap();
        let mut child = Command::new(super::binary::example_binary())
            .current_dir(dir)
            .args(["--config", "gateway.toml"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = stdout.next().unwrap().unwrap();
        let addr = first
            .strip_prefix("tollgate gateway listening on http://")
            .unwrap_or_else(|| panic!("{first}"))
            .parse()
            .unwrap();
        // Keep reading so that the pipe never fills.
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.map_while(Result::ok) {
                let _ = send.send(line);
            }
        });
        Process { child, addr, lines }
    }

    /// `kill -9`: no shutdown, no last settlement or group commit.
    #[allow(dead_code)]
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM and wait for the exit: its status, and whether it printed that it stopped.
    #[allow(dead_code)]
    pub async fn terminate(mut self) -> (std::process::ExitStatus, bool) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // Its stdout closes with it: the reader thread has sent every line.
        let stopped = self
            .lines
            .recv_timeout(Duration::from_secs(5))
            .into_iter()
            .chain(self.lines.iter())
            .any(|line| line == "tollgate gateway stopped");
        (status, stopped)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
