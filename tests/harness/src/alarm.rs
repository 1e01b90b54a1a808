//! A proxy in front of RabbitMQ that plays a resource alarm to its clients: while raised, every
//! client connection gets `connection.blocked`, as RabbitMQ sends it when a memory or disk
//! alarm stops publishers, and `connection.unblocked` once cleared. Raising a real alarm
//! (`rabbitmqctl set_vm_memory_high_watermark`) would block every test sharing the broker.
//!
//! The client library stops writing to a blocked connection, so the broker itself needs no
//! part in it: frames from the server are forwarded whole, and the notices go in between them.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};

pub struct AlarmProxy {
    pub addr: SocketAddr,
    alarm: watch::Sender<bool>,
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

/// `connection.open-ok`: from then on the connection is open and may be told of alarms.
fn is_open_ok(frame: &[u8]) -> bool {
    frame.len() >= 11 && frame[0] == 1 && frame[1..3] == [0, 0] && frame[7..11] == [0, 10, 0, 41]
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
        runtime.spawn(async move {
            let listener = TcpListener::from_std(std_listener).expect("proxy listener");
            while let Ok((client, _)) = listener.accept().await {
                let raised = raised.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(target).await {
                        forward(client, server, raised).await;
                    }
                });
            }
        });
        AlarmProxy {
            addr,
            alarm,
            runtime: Some(runtime),
        }
    }

    /// A proxy in front of the broker of the AMQP URL `url` (`amqp://user:pass@ip:port/vhost`),
    /// and the same URL through it.
    pub async fn in_front_of(url: &str) -> (AlarmProxy, String) {
        let host_port = url
            .split('@')
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .expect("an AMQP URL with user:pass@host:port/vhost");
        let target: SocketAddr = host_port
            .parse()
            .expect("the test broker URL names an IP:port");
        let proxy = AlarmProxy::start(target).await;
        let through = url.replace(host_port, &proxy.addr.to_string());
        (proxy, through)
    }

    /// Every open connection, and every one opened from now on, is told it is blocked.
    pub fn raise(&self) {
        self.alarm.send_replace(true);
    }

    /// Every connection told it was blocked is told it is not any more.
    pub fn clear(&self) {
        self.alarm.send_replace(false);
    }
}

async fn forward(mut client: TcpStream, mut server: TcpStream, mut raised: watch::Receiver<bool>) {
    let (mut from_client, mut to_client) = client.split();
    let (mut from_server, mut to_server) = server.split();
    let upstream = tokio::io::copy(&mut from_client, &mut to_server);
    // Whole frames from the server, so a notice never lands inside one.
    let (frames_tx, mut frames) = mpsc::channel::<Vec<u8>>(64);
    let reader = async move {
        loop {
            let mut header = [0u8; 7];
            if from_server.read_exact(&mut header).await.is_err() {
                return;
            }
            let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]) as usize;
            let mut frame = header.to_vec();
            frame.resize(7 + size + 1, 0);
            if from_server.read_exact(&mut frame[7..]).await.is_err() {
                return;
            }
            if frames_tx.send(frame).await.is_err() {
                return;
            }
        }
    };
    let downstream = async {
        let (mut open, mut told) = (false, false);
        loop {
            tokio::select! {
                frame = frames.recv() => {
                    let Some(frame) = frame else { return };
                    open |= is_open_ok(&frame);
                    if to_client.write_all(&frame).await.is_err() {
                        return;
                    }
                }
                changed = raised.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
            let want = *raised.borrow_and_update();
            if open && want != told {
                let notice = if want { blocked() } else { unblocked() };
                if to_client.write_all(&notice).await.is_err() {
                    return;
                }
                told = want;
            }
        }
    };
    tokio::select! {
        _ = upstream => {}
        _ = reader => {}
        _ = downstream => {}
    }
    // Let the last bytes out before both sides close.
    tokio::time::sleep(Duration::from_millis(10)).await;
}

impl Drop for AlarmProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}
