//! The forwarders: each connection accepted on vsock port 1025 (or a Unix
//! socket, for tests) is joined to Podman's REST socket, and each one on
//! vsock port 22 to the guest's sshd on TCP, so `ssh` works over vsock with
//! no network.
//!
//! Bytes are copied both ways. End of file on one side becomes a half-close
//! (shutdown of writing) on the other, so a client that shuts its write side
//! after a request still gets the answer (a vsock SHUTDOWN with the SEND
//! flag, never a full close). The connection ends when both directions have
//! ended, or when one side is gone entirely (hung up: it will neither send
//! nor take another byte) and everything it sent was passed on: then the
//! other side is closed too, rather than held half-open until its peer
//! closes. That is what ends `podman --remote run` once Podman closes the
//! attach stream, even over a vsock transport that drops a SHUTDOWN(SEND)
//! (vhost-device-vsock 0.3, rust-vmm/vhost-device#874).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;

use log::{debug, warn};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest};

use crate::dispatch::Agent;

/// Joins one accepted connection to Podman's REST socket.
pub async fn forward<S>(agent: Arc<Agent>, client: S)
where
    S: AsyncRead + AsyncWrite + AsRawFd + Unpin,
{
    let upstream = match agent.podman().service().connect().await {
        Ok(s) => s,
        Err(e) => {
            warn!("forwarding to podman: {e}");
            return;
        }
    };
    join(client, upstream).await;
}

/// Joins one accepted connection to the TCP service at `target`.
pub async fn forward_tcp<S>(target: SocketAddr, client: S)
where
    S: AsyncRead + AsyncWrite + AsRawFd + Unpin,
{
    let upstream = match tokio::net::TcpStream::connect(target).await {
        Ok(s) => s,
        Err(e) => {
            warn!("forwarding to {target}: {e}");
            return;
        }
    };
    join(client, upstream).await;
}

/// Copies `from` to `to` until end of file, then shuts `to`'s write side.
async fn pump<R, W>(from: &mut R, to: &mut W) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let n = tokio::io::copy(from, to).await?;
    to.shutdown().await?;
    Ok(n)
}

/// Resolves once the socket behind `fd` is hung up (POLLHUP or an error:
/// both directions are over for it); never if that cannot be watched.
async fn hung_up(watch: Option<AsyncFd<OwnedFd>>) {
    let Some(watch) = watch else {
        return std::future::pending().await;
    };
    loop {
        // Registered for PRIORITY alone, so only EPOLLHUP / EPOLLERR (which
        // epoll always reports) wake this, never plain readability.
        let Ok(mut guard) = watch.ready(Interest::PRIORITY).await else {
            return std::future::pending().await;
        };
        let r = guard.ready();
        if r.is_read_closed() || r.is_write_closed() || r.is_error() {
            return;
        }
        guard.clear_ready();
    }
}

/// A second descriptor for `fd`, watched for hang-up only.
fn hup_watch(fd: RawFd) -> Option<AsyncFd<OwnedFd>> {
    // SAFETY: `fd` belongs to a stream that outlives this call; it is only
    // duplicated here.
    let dup = unsafe { BorrowedFd::borrow_raw(fd) }
        .try_clone_to_owned()
        .ok()?;
    // SAFETY: the AsyncFd owns `dup`, which stays open (and names the same
    // socket) until the AsyncFd is dropped.
    unsafe { AsyncFd::register_with_interest(dup, Interest::PRIORITY) }.ok()
}

pub async fn join<A, B>(a: A, b: B)
where
    A: AsyncRead + AsyncWrite + AsRawFd + Unpin,
    B: AsyncRead + AsyncWrite + AsRawFd + Unpin,
{
    let (a_hup, b_hup) = (hup_watch(a.as_raw_fd()), hup_watch(b.as_raw_fd()));
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let up = pump(&mut ar, &mut bw);
    let down = pump(&mut br, &mut aw);
    let (a_gone, b_gone) = (hung_up(a_hup), hung_up(b_hup));
    tokio::pin!(up, down, a_gone, b_gone);
    let (mut up_done, mut down_done) = (None, None);
    let (mut a_hung, mut b_hung) = (false, false);
    let why = loop {
        tokio::select! {
            r = &mut up, if up_done.is_none() => match r {
                Ok(n) => up_done = Some(n),
                Err(e) => break format!("client to upstream: {e}"),
            },
            r = &mut down, if down_done.is_none() => match r {
                Ok(n) => down_done = Some(n),
                Err(e) => break format!("upstream to client: {e}"),
            },
            _ = &mut a_gone, if !a_hung => a_hung = true,
            _ = &mut b_gone, if !b_hung => b_hung = true,
        }
        match (up_done, down_done) {
            (Some(_), Some(_)) => break "both directions ended".into(),
            (Some(_), None) if a_hung => break "the client hung up".into(),
            (None, Some(_)) if b_hung => break "upstream hung up".into(),
            _ => {}
        }
    };
    debug!(
        "forwarded {} bytes up, {} down; {why}",
        up_done.unwrap_or(0),
        down_done.unwrap_or(0)
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixStream;

    async fn read_all(s: &mut UnixStream) -> Vec<u8> {
        let mut v = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut v))
            .await
            .expect("no end of file within 5 s")
            .unwrap();
        v
    }

    #[tokio::test]
    async fn client_half_close_still_gets_the_answer() {
        let (mut client, agent_side) = UnixStream::pair().unwrap();
        let (agent_up, mut server) = UnixStream::pair().unwrap();
        let j = tokio::spawn(join(agent_side, agent_up));
        client.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
        client.shutdown().await.unwrap();
        // The server reads the request to its end, then still answers.
        assert_eq!(read_all(&mut server).await, b"GET / HTTP/1.0\r\n\r\n");
        server.write_all(b"HTTP/1.0 200 OK\r\n\r\n").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(read_all(&mut client).await, b"HTTP/1.0 200 OK\r\n\r\n");
        tokio::time::timeout(Duration::from_secs(5), j)
            .await
            .expect("both directions ended, the join did not")
            .unwrap();
    }

    #[tokio::test]
    async fn upstream_half_close_keeps_the_client_sending() {
        let (mut client, agent_side) = UnixStream::pair().unwrap();
        let (agent_up, mut server) = UnixStream::pair().unwrap();
        let j = tokio::spawn(join(agent_side, agent_up));
        server.write_all(b"banner").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(read_all(&mut client).await, b"banner");
        // The server only shut its write side: the client's bytes still
        // reach it.
        client.write_all(b"stdin").await.unwrap();
        client.shutdown().await.unwrap();
        assert_eq!(read_all(&mut server).await, b"stdin");
        drop(server);
        tokio::time::timeout(Duration::from_secs(5), j)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn upstream_gone_closes_the_client() {
        // Podman closes the attach stream after `run`: the client reads all
        // of it and end of file, and the connection is over at once even
        // though the client never shut its own side (over a transport that
        // drops half-closes this full close is what reaches the client).
        let (mut client, agent_side) = UnixStream::pair().unwrap();
        let (agent_up, mut server) = UnixStream::pair().unwrap();
        let j = tokio::spawn(join(agent_side, agent_up));
        let big = vec![7u8; 1 << 20];
        let sent = big.clone();
        let w = tokio::spawn(async move {
            server.write_all(&sent).await.unwrap();
            drop(server);
        });
        assert_eq!(read_all(&mut client).await, big);
        w.await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), j)
            .await
            .expect("upstream hung up, the join did not end")
            .unwrap();
        // The client's side is closed, not half-open: its writes fail.
        let mut failed = false;
        for _ in 0..100 {
            if client.write_all(b"more").await.is_err() {
                failed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(failed, "the client's connection stayed open");
    }

    #[tokio::test]
    async fn client_gone_closes_the_upstream() {
        let (mut client, agent_side) = UnixStream::pair().unwrap();
        let (agent_up, mut server) = UnixStream::pair().unwrap();
        let j = tokio::spawn(join(agent_side, agent_up));
        client.write_all(b"last").await.unwrap();
        drop(client);
        assert_eq!(read_all(&mut server).await, b"last");
        tokio::time::timeout(Duration::from_secs(5), j)
            .await
            .expect("the client hung up, the join did not end")
            .unwrap();
    }
}
