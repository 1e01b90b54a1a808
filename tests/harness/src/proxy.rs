//! A TCP proxy a test can cut and restore: from the client's side, the server behind it goes
//! away (every connection drops, new ones are closed at once) and comes back — without
//! stopping a service other tests share.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// A pattern that, once seen going to the server, ends its connection without the answer,
/// and how long the bytes holding it are held back from the server.
type Trap = Arc<Mutex<Option<(Vec<u8>, Duration)>>>;

/// How a proxied connection's forwarding ended.
enum End {
    Closed,
    /// The trap's pattern went by: these bytes are still to reach the server, after the delay.
    Trapped(Vec<u8>, Duration),
}

pub struct TcpProxy {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    /// While set, nothing the clients send reaches the server: it looks alive and silent.
    stalled: Arc<AtomicBool>,
    /// Connections accepted so far, numbered from 0 in order.
    accepted: Arc<AtomicU64>,
    /// Connections numbered below this one are stalled as with `stalled` (0: none).
    stalled_below: Arc<AtomicU64>,
    /// Connections numbered below this one pass nothing either way (0: none).
    silent_below: Arc<AtomicU64>,
    cuts: watch::Sender<u64>,
    trap: Trap,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TcpProxy {
    /// Runs on a runtime of its own, so it keeps forwarding while the test's own (often
    /// single-threaded) runtime is blocked, e.g. waiting for a child process to start.
    pub async fn start(target: SocketAddr) -> TcpProxy {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("proxy runtime");
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("proxy address");
        let open = Arc::new(AtomicBool::new(true));
        let stalled = Arc::new(AtomicBool::new(false));
        let (cuts, _) = watch::channel(0u64);
        let trap: Trap = Arc::default();
        let (gate, kill, armed) = (open.clone(), cuts.subscribe(), trap.clone());
        let silent = stalled.clone();
        let accepted = Arc::new(AtomicU64::new(0));
        let stalled_below = Arc::new(AtomicU64::new(0));
        let silent_below = Arc::new(AtomicU64::new(0));
        let (count, below) = (accepted.clone(), stalled_below.clone());
        let hushed = silent_below.clone();
        runtime.spawn(async move {
            let listener = TcpListener::from_std(std_listener).expect("proxy listener");
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if !gate.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let mut kill = kill.clone();
                kill.mark_unchanged();
                let armed = armed.clone();
                let silent = silent.clone();
                let (number, below) = (count.fetch_add(1, Ordering::SeqCst), below.clone());
                let hushed = hushed.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut from_client, mut to_client) = client.split();
                    let (mut from_server, mut to_server) = server.split();
                    let upstream = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match from_client.read(&mut buf).await {
                                Ok(0) | Err(_) => return End::Closed,
                                Ok(n) => n,
                            };
                            let sprung = {
                                let mut trap = armed.lock().unwrap_or_else(|p| p.into_inner());
                                let hit = trap.as_ref().is_some_and(|(pat, _)| {
                                    buf[..n].windows(pat.len()).any(|w| w == pat.as_slice())
                                });
                                if hit {
                                    trap.take().map(|(_, delay)| delay)
                                } else {
                                    None
                                }
                            };
                            if let Some(delay) = sprung {
                                return End::Trapped(buf[..n].to_vec(), delay);
                            }
                            while silent.load(Ordering::SeqCst)
                                || number < below.load(Ordering::SeqCst)
                                || number < hushed.load(Ordering::SeqCst)
                            {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                            if to_server.write_all(&buf[..n]).await.is_err() {
                                return End::Closed;
                            }
                        }
                    };
                    let downstream = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match from_server.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            while number < hushed.load(Ordering::SeqCst) {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                            if to_client.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    let end = tokio::select! {
                        end = upstream => end,
                        _ = downstream => End::Closed,
                        _ = kill.changed() => End::Closed,
                    };
                    if let End::Trapped(bytes, delay) = end {
                        // The client loses the connection now; the server gets what was sent
                        // later, acts on it, and nothing it answers goes anywhere.
                        drop(client);
                        tokio::time::sleep(delay).await;
                        let _ = server.write_all(&bytes).await;
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                });
            }
        });
        TcpProxy {
            addr,
            open,
            stalled,
            accepted,
            stalled_below,
            silent_below,
            cuts,
            trap,
            runtime: Some(runtime),
        }
    }

    /// A proxy in front of the server of the database URL `url` (`postgres://user@ip:port/db`),
    /// and the same URL through it.
    pub async fn in_front_of(url: &str) -> (TcpProxy, String) {
        let (host_port, target) = target_of(url);
        let proxy = TcpProxy::start(target).await;
        let through = url.replace(host_port, &proxy.addr.to_string());
        (proxy, through)
    }

    /// Drops every connection and refuses new ones until [`TcpProxy::restore`].
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }

    /// The next time `pattern` goes to the server on any connection, the client's side of that
    /// connection is closed at once, and the bytes holding the pattern reach the server `delay`
    /// later, whose answer goes nowhere: "the request went out and the connection was lost",
    /// with the server acting on it before or after the client notices. Once only.
    pub fn drop_answer_to(&self, pattern: &[u8], delay: Duration) {
        *self.trap.lock().unwrap_or_else(|p| p.into_inner()) = Some((pattern.to_vec(), delay));
    }

    /// Holds back everything clients send, on open and new connections alike, until
    /// [`TcpProxy::restore`]: the server seems up (connections are accepted) but never answers.
    pub fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
    }

    /// Holds back everything clients send on the connections open now, until
    /// [`TcpProxy::restore`]; new connections go through: connections that died silently (a
    /// failover, a dropped NAT entry) while the server is still there.
    pub fn stall_open(&self) {
        self.stalled_below
            .store(self.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    /// Passes nothing either way on the connections open now, until [`TcpProxy::restore`];
    /// new connections go through: a peer that vanished without closing (a failover whose old
    /// host is gone), as its side of the connection sees it.
    pub fn silence_open(&self) {
        self.silent_below
            .store(self.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
        self.stalled.store(false, Ordering::SeqCst);
        self.stalled_below.store(0, Ordering::SeqCst);
        self.silent_below.store(0, Ordering::SeqCst);
    }
}

/// The `host:port` of a URL of the form `scheme://user[:password]@ip:port/…`, and its address.
pub(crate) fn target_of(url: &str) -> (&str, SocketAddr) {
    let host_port = url
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("a URL with user@host:port/…");
    let target = host_port
        .parse()
        .expect("the test service's URL names an IP:port");
    (host_port, target)
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cuts.send_modify(|n| *n += 1);
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}
