//! The listener thread's HTTP clients to the shards: one per shard, each with its own pool of
//! `gateway.upstream_connections` connections. A shard that stops answering ties up only its
//! own connections; requests to every other shard still find theirs free. (One client for all
//! shards would let a hanging shard take every connection, and the other shards' requests
//! would wait for one until they timed out.)

use std::{cell::RefCell, collections::HashMap, time::Duration};

/// Built per listener thread (awc's client is not `Send`); the map holds one entry per shard
/// this thread has forwarded to, so it is bounded by the number of shards.
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

    /// The client for `shard`, made on first use.
    pub fn client(&self, shard: &str) -> awc::Client {
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
        self.clients
            .borrow_mut()
            .insert(shard.to_owned(), client.clone());
        client
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_shard_gets_its_own_client_and_keeps_it() {
        let u = Upstreams::new(Duration::from_secs(1), 4);
        let _a = u.client("shard-1");
        let _b = u.client("shard-2");
        let _a_again = u.client("shard-1");
        assert_eq!(u.clients.borrow().len(), 2);
    }
}
