//! A proxy in front of RabbitMQ that plays a resource alarm to its clients the way RabbitMQ
//! does: while the alarm is raised, a connection that publishes is sent `connection.blocked`
//! and nothing more it sends is read (here: forwarded to the broker); once the alarm clears it
//! is sent `connection.unblocked` and what it sent meanwhile goes on to the broker. Raising a
//! real alarm (`rabbitmqctl set_vm_memory_high_watermark`) would block every test sharing the
//! broker.

use std::net::SocketAddr;

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};

pub struct AlarmProxy {
    pub addr: SocketAddr,
    alarm: watch::Sender<bool>,
    /// Bumped to close every connection open through the proxy.
    cut: watch::Sender<u64>,
    runtime: Option<tokio::runtime::Runtime>,
}

/// An AMQP 0-9-1 method frame on channel 0 of class `connection` (10).
fn connection_method(method: u16, args: &[u8]) -> Vec<u8> {
    let mut f = vec![1u8, 0, 0];
    f.extend_from_slice(&(4 + args.len() as u32).to_be_bytes());
    f.extend_from_slice(&10u16.to_be_bytes());
    f.extend_from_slice(&method.to_be_bytes());
    f.extend_from_slice(args);
    f.push(0xCE);
    f
}

fn blocked() -> Vec<u8> {
    let reason = b"low on memory (test alarm)";
    let mut args = vec![reason.len() as u8];
    args.extend_from_slice(reason);
    connection_method(60, &args)
}

fn unblocked() -> Vec<u8> {
    connection_method(61, &[])
}

/// A method frame of `class`.`method`.
fn is_method(frame: &[u8], class: u16, method: u16) -> bool {
    frame.len() >= 11
        && frame[0] == 1
        && frame[7..9] == class.to_be_bytes()
        && frame[9..11] == method.to_be_bytes()
}

/// One whole frame (header, payload, end octet), or `None` at the end of the stream.
async fn read_frame(from: &mut (impl AsyncRead + Unpin)) -> Option<Vec<u8>> {
    let mut header = [0u8; 7];
    from.read_exact(&mut header).await.ok()?;
    let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]) as usize;
    let mut frame = header.to_vec();
    frame.resize(7 + size + 1, 0);
    from.read_exact(&mut frame[7..]).await.ok()?;
    Some(frame)
}

impl AlarmProxy {
    /// Runs on a runtime of its own, like [`crate::proxy::TcpProxy`].
    pub async fn start(target: SocketAddr) -> AlarmProxy {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("proxy runtime");
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("proxy address");
        let (alarm, _) = watch::channel(false);
        let raised = alarm.subscribe();
        let (cut, _) = watch::channel(0u64);
        let cuts = cut.subscribe();
        runtime.spawn(async move {
            let listener = TcpListener::from_std(std_listener).expect("proxy listener");
            while let Ok((client, _)) = listener.accept().await {
                let raised = raised.clone();
                let mut cuts = cuts.clone();
                cuts.mark_unchanged();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(target).await {
                        tokio::select! {
                            () = forward(client, server, raised) => {}
                            _ = cuts.changed() => {}
                        }
                    }
                });
            }
        });
        AlarmProxy {
            addr,
            alarm,
            cut,
            runtime: Some(runtime),
        }
    }

    /// A proxy in front of the broker of the AMQP URL `url` (`amqp://user:pass@ip:port/vhost`),
    /// and the same URL through it.
    pub async fn in_front_of(url: &str) -> (AlarmProxy, String) {
        let (host_port, target) = crate::proxy::target_of(url);
        let proxy = AlarmProxy::start(target).await;
        let through = url.replace(host_port, &proxy.addr.to_string());
        (proxy, through)
    }

    /// From now on, a connection that publishes is blocked.
    pub fn raise(&self) {
        self.alarm.send_replace(true);
    }

    /// Blocked connections are unblocked, and what they sent meanwhile reaches the broker.
    pub fn clear(&self) {
        self.alarm.send_replace(false);
    }

    /// Closes every connection open through the proxy (as a broker restart would), without a
    /// word to either side; later connections go through as usual.
    pub fn cut_connections(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

/// Reads whole frames into a channel (`skip` bytes first: the client's protocol header),
/// so the loops below can wait on other things without losing half a frame.
fn frames(
    mut from: tokio::net::tcp::OwnedReadHalf,
    skip: usize,
) -> (mpsc::Receiver<Vec<u8>>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(64);
    let task = tokio::spawn(async move {
        let mut header = vec![0u8; skip];
        if from.read_exact(&mut header).await.is_err() || tx.send(header).await.is_err() {
            return;
        }
        while let Some(frame) = read_frame(&mut from).await {
            if tx.send(frame).await.is_err() {
                return;
            }
        }
    });
    (rx, task)
}

async fn forward(client: TcpStream, server: TcpStream, raised: watch::Receiver<bool>) {
    let (from_client, mut to_client) = client.into_split();
    let (from_server, mut to_server) = server.into_split();
    let (mut client_frames, client_reader) = frames(from_client, 8);
    let (mut server_frames, server_reader) = frames(from_server, 0);
    // Tells the side writing to the client to send `connection.blocked`.
    let (block_tx, mut block) = mpsc::channel::<()>(1);
    let upstream = {
        let mut raised = raised.clone();
        async move {
            loop {
                let frame = client_frames.recv().await?;
                if *raised.borrow_and_update() && is_method(&frame, 60, 40) {
                    // basic.publish during the alarm: blocked, and nothing more is read on.
                    block_tx.send(()).await.ok()?;
                    let mut held = frame;
                    while *raised.borrow_and_update() {
                        tokio::select! {
                            more = client_frames.recv() => held.extend(more?),
                            changed = raised.changed() => changed.ok()?,
                        }
                    }
                    to_server.write_all(&held).await.ok()?;
                    continue;
                }
                to_server.write_all(&frame).await.ok()?;
            }
            #[allow(unreachable_code)]
            Some(())
        }
    };
    let downstream = {
        let mut raised = raised.clone();
        async move {
            let mut told = false;
            loop {
                tokio::select! {
                    frame = server_frames.recv() => to_client.write_all(&frame?).await.ok()?,
                    Some(()) = block.recv() => {
                        if !told {
                            to_client.write_all(&blocked()).await.ok()?;
                            told = true;
                        }
                    }
                    changed = raised.changed() => {
                        changed.ok()?;
                        if told && !*raised.borrow_and_update() {
                            to_client.write_all(&unblocked()).await.ok()?;
                            told = false;
                        }
                    }
                }
            }
            #[allow(unreachable_code)]
            Some(())
        }
    };
    tokio::select! {
        _ = upstream => {}
        _ = downstream => {}
    }
    client_reader.abort();
    server_reader.abort();
}

impl Drop for AlarmProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}
