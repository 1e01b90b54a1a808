//! A TCP proxy a test can cut and restore: from the client's side, the server behind it goes
//! away (every connection drops, new ones are closed at once) and comes back — without
//! stopping a service other tests share.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};

pub struct TcpProxy {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    cuts: watch::Sender<u64>,
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
        let (cuts, _) = watch::channel(0u64);
        let (gate, kill) = (open.clone(), cuts.subscribe());
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
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = kill.changed() => {}
                    }
                });
            }
        });
        TcpProxy {
            addr,
            open,
            cuts,
            runtime: Some(runtime),
        }
    }

    /// Drops every connection and refuses new ones until [`TcpProxy::restore`].
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cuts.send_modify(|n| *n += 1);
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}
