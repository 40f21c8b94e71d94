//! A JetStream cluster of real `nats-server` processes on loopback, for tests that take a node away
//! and bring it back.
//!
//! Each node is a [`NatsServer`] (its own client, monitoring and route ports, its own store
//! directory) started with `-js`, a server name `n{i}`, one cluster name and routes to every node.
//! A killed node keeps its ports and store, so a restart rejoins as the same peer and catches up.

use std::time::Duration;

use crate::{NatsServer, free_port, http_get, wait_for};

/// How long a (re)started cluster may take to elect a JetStream meta leader.
const LEADER_DEADLINE: Duration = Duration::from_secs(30);

/// `size` nodes of one JetStream cluster; every node is killed (by PID) when this drops.
pub struct Cluster {
    nodes: Vec<NatsServer>,
}

impl Cluster {
    /// Starts `size` nodes and waits until every node knows the JetStream meta leader.
    pub async fn start(size: usize) -> Self {
        let name = format!("test-cluster-{}", free_port());
        let route_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let routes = route_ports.iter().map(|port| format!("nats://127.0.0.1:{port}")).collect::<Vec<_>>().join(",");
        let mut nodes = Vec::with_capacity(size);
        for (i, port) in route_ports.iter().enumerate() {
            let args = [
                "-n".to_owned(),
                format!("n{i}"),
                "--cluster_name".to_owned(),
                name.clone(),
                "--cluster".to_owned(),
                format!("nats://127.0.0.1:{port}"),
                "--routes".to_owned(),
                routes.clone(),
            ];
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            nodes.push(NatsServer::start_with_args(&args).await);
        }
        let cluster = Cluster { nodes };
        cluster.wait_for_meta_leader().await;
        cluster
    }

    /// The client URLs of every node (running or not), in node order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }

    /// Node `i` (server name `n{i}`).
    pub fn node(&self, i: usize) -> &NatsServer {
        &self.nodes[i]
    }

    /// The index of the node whose server name is `name` (`n{i}`), as JetStream reports leaders.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        name.strip_prefix('n')?.parse().ok().filter(|i| *i < self.nodes.len())
    }

    /// Kills node `i` (SIGKILL); its ports and store directory stay for [`Cluster::restart`].
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].stop();
    }

    /// Starts node `i` again and waits until it is ready and knows the meta leader.
    pub async fn restart(&mut self, i: usize) {
        self.nodes[i].restart().await;
        self.wait_for_meta_leader().await;
    }

    /// Waits until every running node reports the same JetStream meta leader.
    pub async fn wait_for_meta_leader(&self) {
        let monitors: Vec<u16> = self.nodes.iter().filter(|n| n.pid().is_some()).map(|n| n.monitor_port).collect();
        wait_for("a JetStream meta leader known to every running node", LEADER_DEADLINE, || {
            let monitors = monitors.clone();
            async move {
                let mut leaders = Vec::new();
                for port in monitors {
                    let (200, body) = http_get(port, "/jsz").await.ok()? else { return None };
                    let jsz: serde_json::Value = serde_json::from_str(&body).ok()?;
                    let leader = jsz["meta_cluster"]["leader"].as_str().filter(|l| !l.is_empty())?;
                    leaders.push(leader.to_owned());
                }
                leaders.windows(2).all(|pair| pair[0] == pair[1]).then_some(())
            }
        })
        .await;
    }
}
