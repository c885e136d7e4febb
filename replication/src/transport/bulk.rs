//! The peer `tandem bench pipeline` measures the pipeline against: plain QUIC with this
//! transport's TLS and settings and nothing of tandem's on top.

use super::{dial, Listener, TransportError};

/// A plain QUIC bulk transfer of `bytes` over loopback with this transport's TLS and
/// settings and nothing of tandem's on top: one stream, written in 1 MiB chunks and read
/// to its end, the caller's pages from first to last and round again. The peer `tandem
/// bench pipeline` measures the pipeline against. The pages are read from memory as the
/// pipeline reads a guest's: the same MiB over and over would be read from cache.
pub async fn bulk(bytes: u64, pages: &[u8], server: rustls::ServerConfig, client: rustls::ClientConfig) -> Result<std::time::Duration, TransportError> {
    let listener = Listener::bind(([127, 0, 0, 1], 0).into(), server)?;
    let addr = listener.local_addr()?;
    let receiver = tokio::spawn(async move {
        let incoming = listener.endpoint.accept().await.ok_or(TransportError::Closed)?;
        let connection = incoming.await?;
        let mut recv = connection.accept_uni().await?;
        let mut got = 0u64;
        while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
            got += chunk.bytes.len() as u64;
        }
        Ok::<_, TransportError>((got, connection))
    });
    let (connection, _endpoint) = dial(addr, client).await?;
    let start = std::time::Instant::now();
    let mut send = connection.open_uni().await?;
    if pages.is_empty() {
        return Err(TransportError::Stream("a bulk transfer of no pages".into()));
    }
    let (mut sent, mut at) = (0u64, 0usize);
    while sent < bytes {
        if at == pages.len() {
            at = 0;
        }
        let n = (bytes - sent).min(1 << 20).min((pages.len() - at) as u64) as usize;
        send.write_all(&pages[at..at + n]).await?;
        (sent, at) = (sent + n as u64, at + n);
    }
    send.finish().map_err(|e| TransportError::Stream(e.to_string()))?;
    let joined = receiver.await.map_err(|e| TransportError::Stream(e.to_string()))?;
    let (got, _connection) = joined?;
    let took = start.elapsed();
    connection.close(0u32.into(), b"done");
    if got != bytes {
        return Err(TransportError::Stream(format!("the bulk transfer delivered {got} of {bytes} bytes")));
    }
    Ok(took)
}

