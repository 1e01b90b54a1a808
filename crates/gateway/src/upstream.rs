//! The listener thread's HTTP clients to the shards: one per shard, each with its own pool of
//! `gateway.upstream_connections` connections. A shard that stops answering ties up only its
//! own connections; requests to every other shard still find theirs free. (One client for all
//! shards would let a hanging shard take every connection, and the other shards' requests
//! would wait for one until they timed out.)

use std::{cell::RefCell, collections::HashMap, time::Duration};

/// Built per listener thread (awc's client is not `Send`); the map holds one entry per shard
/// this thread has forwarded to. Clients of shards no longer in the shard table are dropped
/// (with their pooled connections) whenever a new one is made, so it stays bounded by the
/// number of shards.
pub struct Upstreams {
    connect_timeout: Duration,
    connections: usize,
    clients: RefCell<HashMap<String, awc::Client>>,
}

impl Upstreams {
    pub fn new(connect_timeout: Duration, connections: usize) -> Self {
        Self {
            connect_timeout,
            connections,
            clients: RefCell::default(),
        }
    }

    /// The client for `shard`, made on first use; `in_table` tells which shards are still in
    /// the shard table.
    pub fn client(&self, shard: &str, in_table: impl Fn(&str) -> bool) -> awc::Client {
        if let Some(client) = self.clients.borrow().get(shard) {
            return client.clone();
        }
        // Pooled connections are dropped after 3 s idle, before the shards' 5 s keep-alive
        // ends, so a request never lands on a connection the shard is closing.
        let client = awc::Client::builder()
            .connector(
                awc::Connector::new()
                    .timeout(self.connect_timeout)
                    .limit(self.connections)
                    .conn_keep_alive(Duration::from_secs(3)),
            )
            .disable_redirects()
            .finish();
        let mut clients = self.clients.borrow_mut();
        clients.retain(|id, _| in_table(id));
        clients.insert(shard.to_owned(), client.clone());
        client
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_shard_gets_its_own_client_and_retired_shards_lose_theirs() {
        let u = Upstreams::new(Duration::from_secs(1), 4);
        let all = |_: &str| true;
        let _a = u.client("shard-1", all);
        let _b = u.client("shard-2", all);
        let _a_again = u.client("shard-1", all);
        assert_eq!(u.clients.borrow().len(), 2);
        // shard-2 left the shard table: its client goes when the next one is made.
        let _c = u.client("shard-3", |id: &str| id != "shard-2");
        let mut left: Vec<_> = u.clients.borrow().keys().cloned().collect();
        left.sort();
        assert_eq!(left, ["shard-1", "shard-3"]);
    }
}
