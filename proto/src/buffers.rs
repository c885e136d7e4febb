//! Buffers lent to the bytes that point into them, and handed back once the last such
//! slice is gone: a capture's pages to the frames that carry them, a large frame's
//! buffer to the staged epoch that keeps its pages. Fresh memory faults in a page at a
//! time, which costs more than the copies these buffers exist to avoid.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Where a lent buffer goes once the last slice of it is dropped.
pub type GiveBack = Arc<dyn Fn(Vec<u8>) + Send + Sync>;

struct Lent {
    data: Vec<u8>,
    back: GiveBack,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        (self.back)(std::mem::take(&mut self.data));
    }
}

/// A [`GiveBack`] that sends each buffer to the receiver returned with it, for whoever
/// fills the buffers again to take back when it is ready (a receiver gone, a buffer is
/// simply freed).
pub fn returned() -> (GiveBack, std::sync::mpsc::Receiver<Vec<u8>>) {
    let (back, returned) = std::sync::mpsc::channel();
    let give_back: GiveBack = Arc::new(move |buffer| {
        let _ = back.send(buffer);
    });
    (give_back, returned)
}

/// `data` as shared bytes that can be sliced, handed to `back` (if any) once no slice
/// of it is left.
pub fn lend(data: Vec<u8>, back: Option<&GiveBack>) -> Bytes {
    match back {
        Some(back) => Bytes::from_owner(Lent { data, back: back.clone() }),
        None => Bytes::from(data),
    }
}

/// Buffers that come back once nothing points into them, up to `keep` of them.
#[derive(Clone)]
pub(crate) struct Pool {
    free: Arc<Mutex<Vec<Vec<u8>>>>,
    back: GiveBack,
}

impl Pool {
    pub(crate) fn new(keep: usize) -> Self {
        let free: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let kept = free.clone();
        let back: GiveBack = Arc::new(move |buffer| {
            let mut free = kept.lock().unwrap_or_else(|e| e.into_inner());
            if free.len() < keep {
                free.push(buffer);
            }
        });
        Self { free, back }
    }

    /// An empty buffer with room for `len` bytes.
    pub(crate) fn take(&self, len: usize) -> Vec<u8> {
        let mut buffer = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_default();
        buffer.clear();
        buffer.reserve_exact(len);
        buffer
    }

    /// `buffer` as shared bytes, back in the pool once no slice of it is left.
    pub(crate) fn share(&self, buffer: Vec<u8>) -> Bytes {
        lend(buffer, Some(&self.back))
    }
}
