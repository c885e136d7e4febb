//! A UDP relay between two hosts on the loopback that a test can cut and mend: the
//! partition tests' link. Each client address gets a socket of its own towards the
//! target, so the target sees one peer per client, as through a NAT.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Relay {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    /// Relays datagrams sent to the returned relay's `addr` on to `target`, and the
    /// answers back.
    pub fn start(target: SocketAddr) -> Self {
        let front = UdpSocket::bind("127.0.0.1:0").unwrap();
        front.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let addr = front.local_addr().unwrap();
        let (cut, stop) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let (c, s) = (cut.clone(), stop.clone());
        std::thread::spawn(move || {
            let front = Arc::new(front);
            let backs: Mutex<HashMap<SocketAddr, Arc<UdpSocket>>> = Mutex::new(HashMap::new());
            let mut buf = vec![0u8; 65536];
            while !s.load(Ordering::Relaxed) {
                let Ok((n, client)) = front.recv_from(&mut buf) else { continue };
                if c.load(Ordering::Relaxed) {
                    continue;
                }
                let back = backs
                    .lock()
                    .unwrap()
                    .entry(client)
                    .or_insert_with(|| {
                        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
                        back.connect(target).unwrap();
                        back.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                        let (front, back2, c, s) = (front.clone(), back.clone(), c.clone(), s.clone());
                        std::thread::spawn(move || {
                            let mut buf = vec![0u8; 65536];
                            while !s.load(Ordering::Relaxed) {
                                let Ok(n) = back2.recv(&mut buf) else { continue };
                                if !c.load(Ordering::Relaxed) {
                                    let _ = front.send_to(&buf[..n], client);
                                }
                            }
                        });
                        back
                    })
                    .clone();
                let _ = back.send(&buf[..n]);
            }
        });
        Self { addr, cut, stop }
    }

    /// Drops every datagram both ways from now on (`true`), or none (`false`).
    pub fn cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
