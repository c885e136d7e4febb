//! A UDP relay between two hosts on the loopback that a drill can cut and mend: the
//! partition drill's links. Each client address gets a socket of its own towards the
//! target, so the target sees one peer per client, as through a NAT.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub(crate) struct Relay {
    pub(crate) addr: SocketAddr,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    /// Relays datagrams sent to the returned relay's `addr` on to `target`, and the
    /// answers back.
    pub(crate) fn start(target: SocketAddr) -> std::io::Result<Self> {
        let front = UdpSocket::bind("127.0.0.1:0")?;
        front.set_read_timeout(Some(Duration::from_millis(50)))?;
        let addr = front.local_addr()?;
        let (cut, stop) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let (c, s) = (cut.clone(), stop.clone());
        std::thread::spawn(move || {
            let front = Arc::new(front);
            let mut backs: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut buf = vec![0u8; 65536];
            while !s.load(Ordering::Relaxed) {
                let Ok((n, client)) = front.recv_from(&mut buf) else { continue };
                if c.load(Ordering::Relaxed) {
                    continue;
                }
                let back = match backs.get(&client) {
                    Some(back) => back.clone(),
                    None => {
                        let Ok(back) = Self::back(target) else { continue };
                        let back = Arc::new(back);
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
                        backs.insert(client, back.clone());
                        back
                    }
                };
                let _ = back.send(&buf[..n]);
            }
        });
        Ok(Self { addr, cut, stop })
    }

    fn back(target: SocketAddr) -> std::io::Result<UdpSocket> {
        let back = UdpSocket::bind("127.0.0.1:0")?;
        back.connect(target)?;
        back.set_read_timeout(Some(Duration::from_millis(50)))?;
        Ok(back)
    }

    /// Drops every datagram both ways from now on (`true`), or none (`false`).
    pub(crate) fn cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
