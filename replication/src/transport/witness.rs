//! The witness's wire. Each question is a connection of its own with one frame each
//! way: a QUIC handshake costs about a millisecond on a LAN, a host asks rarely (at a
//! loss of its peer, then a lease renewal a second or so), and the witness keeps no
//! state per connection that a cut link could leave stale.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_proto::message::Message;
use tandem_proto::witness::{Answer, Ask};
use tandem_proto::Frame;

use super::{connect, Link, Listener, TransportError};

/// How long a question may take, handshake included, before the witness counts as
/// unreachable for it.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// Asks the witness at `addr` one question.
pub async fn ask(addr: SocketAddr, tls: rustls::ClientConfig, question: Ask) -> Result<Answer, TransportError> {
    let exchange = async {
        let mut link = connect(addr, tls).await?;
        link.send(&Frame { generation: 0, message: Message::WitnessAsk(question) }).await?;
        let answer = match link.recv().await? {
            Some(Frame { message: Message::WitnessAnswer(answer), .. }) => answer,
            Some(other) => {
                return Err(TransportError::Stream(format!("the witness answered with a {:?}", std::mem::discriminant(&other.message))))
            }
            None => return Err(TransportError::Stream("the witness closed the stream without an answer".into())),
        };
        link.close("answered");
        Ok(answer)
    };
    match tokio::time::timeout(ASK_TIMEOUT, exchange).await {
        Ok(result) => result,
        Err(_) => Err(TransportError::Connect { addr, why: format!("no answer within {} s", ASK_TIMEOUT.as_secs()), tls: None }),
    }
}

/// Serves questions on `listener` for ever: `decide` gets each with the asker's
/// certificate and returns the answer (after making it durable).
pub async fn serve<D>(listener: Listener, decide: Arc<Mutex<D>>)
where
    D: FnMut(&Ask, &rustls::pki_types::CertificateDer<'static>) -> Answer + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok(link) => {
                tokio::spawn(answer(link, decide.clone()));
            }
            Err(TransportError::Closed) => return,
            Err(e) => tracing::warn!("a host could not reach the witness: {e}"),
        }
    }
}

async fn answer<D>(mut link: Link, decide: Arc<Mutex<D>>)
where
    D: FnMut(&Ask, &rustls::pki_types::CertificateDer<'static>) -> Answer + Send + 'static,
{
    let peer = link.peer();
    let Some(cert) = link.peer_certificate() else {
        tracing::warn!("{peer} presented no certificate the witness could read");
        return;
    };
    let question = match tokio::time::timeout(ASK_TIMEOUT, link.recv()).await {
        Ok(Ok(Some(Frame { message: Message::WitnessAsk(question), .. }))) => question,
        Ok(Ok(_)) => {
            tracing::warn!("{peer} sent the witness something other than a question");
            link.close("not a witness question");
            return;
        }
        Ok(Err(e)) => {
            tracing::warn!("reading {peer}'s question: {e}");
            return;
        }
        Err(_) => {
            tracing::warn!("{peer} asked nothing within {} s", ASK_TIMEOUT.as_secs());
            return;
        }
    };
    let reply = (decide.lock().unwrap_or_else(|e| e.into_inner()))(&question, &cert);
    if let Err(e) = link.send(&Frame { generation: 0, message: Message::WitnessAnswer(reply) }).await {
        tracing::warn!("answering {peer}: {e}");
        return;
    }
    // The asker closes once it has the answer; waiting for that keeps the answer from
    // being cut off by this side's close.
    let _ = tokio::time::timeout(ASK_TIMEOUT, link.recv()).await;
}
