//! A throwaway Redis Cluster for tests: 6 `redis-server --cluster-enabled yes` on free ports
//! (3 masters, 3 replicas, made by `redis-cli --cluster create --cluster-replicas 1`), no
//! persistence, each node in its own temp dir; only these processes are killed, on drop.

#![allow(dead_code, unreachable_pub)]

use std::{
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

/// One node: its process (None once killed) and port.
struct Node {
    child: Option<Child>,
    port: u16,
}

/// A running cluster of 3 masters with one replica each, `cluster_state:ok`.
pub struct RedisCluster {
    nodes: Vec<Node>,
    dir: PathBuf,
}

/// How long a master may be unreachable before its replica is promoted.
pub const NODE_TIMEOUT_MS: u64 = 1000;

fn free_port() -> u16 {
    // A cluster node also listens on port + 10000 (its bus): both must be free.
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// `redis-cli -p PORT ARGS...`'s output, or None when the node does not answer.
fn cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.success() && !text.starts_with("Could not connect")).then_some(text)
}

fn field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.trim().strip_prefix(name)?.strip_prefix(':'))
}

impl RedisCluster {
    /// Start the 6 nodes, create the cluster, wait until every node reports
    /// `cluster_state:ok` and every replica is in sync with its master.
    pub fn start() -> RedisCluster {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tollgate-cluster-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a temp dir");
        let mut cluster = RedisCluster {
            nodes: Vec::new(),
            dir,
        };
        for _ in 0..6 {
            cluster.spawn_node();
        }
        let addresses: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let status = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli");
        assert!(status.success(), "redis-cli --cluster create failed");
        cluster.wait_ok(Duration::from_secs(30));
        cluster.wait_replicas_in_sync(Duration::from_secs(30));
        cluster
    }

    fn spawn_node(&mut self) {
        for _ in 0..10 {
            let port = free_port();
            let dir = self.dir.join(port.to_string());
            std::fs::create_dir_all(&dir).expect("a node dir");
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string()])
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", "nodes.conf"])
                .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
                // A replica may take over however long its link was down (a loaded machine
                // delays pings): the failover tests need the promotion, not Redis's guard.
                .args(["--cluster-replica-validity-factor", "0"])
                .arg("--dir")
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            let Ok(mut child) = child else { continue };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // exited: a port was taken
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    self.nodes.push(Node {
                        child: Some(child),
                        port,
                    });
                    return;
                }
                thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("could not start a cluster node (is redis-server on PATH?)");
    }

    /// The URLs of every node started (seed nodes for a client).
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }

    /// The ports of the nodes still running.
    pub fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
            .collect()
    }

    /// `CLUSTER NODES` of a live node: (port, is master, failed) per node.
    fn topology(&self) -> Vec<(u16, bool, bool)> {
        for port in self.live_ports() {
            let Some(text) = cli(port, &["cluster", "nodes"]) else {
                continue;
            };
            return text
                .lines()
                .filter_map(|line| {
                    let mut words = line.split_whitespace();
                    let _id = words.next()?;
                    let address = words.next()?;
                    let flags = words.next()?;
                    let port = address
                        .split('@')
                        .next()?
                        .rsplit(':')
                        .next()?
                        .parse()
                        .ok()?;
                    Some((port, flags.contains("master"), flags.contains("fail")))
                })
                .collect();
        }
        panic!("no cluster node answers");
    }

    /// The ports of the masters that are not failed.
    pub fn master_ports(&self) -> Vec<u16> {
        self.topology()
            .into_iter()
            .filter(|&(port, master, failed)| {
                master && !failed && self.live_ports().contains(&port)
            })
            .map(|(port, _, _)| port)
            .collect()
    }

    /// The port of the master that serves `key`'s slot now.
    pub fn master_of(&self, key: &str) -> u16 {
        let port = self.live_ports()[0];
        let slot: u16 = cli(port, &["cluster", "keyslot", key])
            .expect("keyslot")
            .trim()
            .parse()
            .expect("a slot");
        // `CLUSTER NODES`: the master line whose slot ranges contain `slot`.
        let text = cli(port, &["cluster", "nodes"]).expect("cluster nodes");
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.len() < 9 || !words[2].contains("master") || words[2].contains("fail") {
                continue;
            }
            for range in &words[8..] {
                let (lo, hi) = match range.split_once('-') {
                    Some((lo, hi)) => (lo.parse().unwrap_or(1), hi.parse().unwrap_or(0)),
                    None => {
                        let s = range.parse().unwrap_or(u16::MAX);
                        (s, s)
                    }
                };
                if (lo..=hi).contains(&slot) {
                    return words[1]
                        .split('@')
                        .next()
                        .unwrap()
                        .rsplit(':')
                        .next()
                        .unwrap()
                        .parse()
                        .unwrap();
                }
            }
        }
        panic!("no master serves slot {slot}");
    }

    /// Wait until every live node reports `cluster_state:ok`.
    pub fn wait_ok(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let all_ok = self.live_ports().iter().all(|&port| {
                cli(port, &["cluster", "info"])
                    .is_some_and(|info| field(&info, "cluster_state") == Some("ok"))
            });
            if all_ok {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        panic!("cluster not ok within {within:?}");
    }

    /// Wait until every live replica's link to its master is up, its sync done and its
    /// replication offset equal to its master's.
    pub fn wait_replicas_in_sync(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let synced = self.live_ports().iter().all(|&port| {
                let Some(info) = cli(port, &["info", "replication"]) else {
                    return false;
                };
                match field(&info, "role") {
                    Some("master") => {
                        // Every replica it lists acknowledged its whole stream.
                        let offset = field(&info, "master_repl_offset").unwrap_or("");
                        let replicas: usize = field(&info, "connected_slaves")
                            .and_then(|n| n.parse().ok())
                            .unwrap_or(0);
                        (0..replicas).all(|i| {
                            field(&info, &format!("slave{i}"))
                                .is_some_and(|s| s.contains(&format!("offset={offset},")))
                        })
                    }
                    Some("slave") => {
                        field(&info, "master_link_status") == Some("up")
                            && field(&info, "master_sync_in_progress") == Some("0")
                    }
                    _ => false,
                }
            });
            let masters_have_replicas =
                self.topology().iter().filter(|t| !t.1).count() >= 3 || self.live_ports().len() < 6;
            if synced && masters_have_replicas {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        panic!("replicas not in sync within {within:?}");
    }

    /// `kill -9` the node on `port`.
    pub fn kill(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("a node of this cluster");
        if let Some(mut child) = node.child.take() {
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
        }
    }

    /// Wait until a live master serves every slot `port` served (its replica was promoted)
    /// and the cluster is ok again; returns how long that took.
    pub fn wait_promoted(&self, port: u16, within: Duration) -> Duration {
        let start = Instant::now();
        while start.elapsed() < within {
            let topology = self.topology();
            let dead_is_failed = topology.iter().any(|&(p, _, failed)| {
                p == port && (failed || !topology.iter().any(|t| t.0 == port))
            });
            let masters = self.master_ports();
            if dead_is_failed && masters.len() >= 3 && !masters.contains(&port) {
                self.wait_ok(
                    within
                        .saturating_sub(start.elapsed())
                        .max(Duration::from_secs(1)),
                );
                return start.elapsed();
            }
            thread::sleep(Duration::from_millis(20));
        }
        panic!("no replica promoted within {within:?}");
    }

    /// `INFO` section `section` of the node on `port`.
    pub fn info(&self, port: u16, section: &str) -> String {
        cli(port, &["info", section]).unwrap_or_default()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
