//! The bounded buffer of one connection's guest->host bytes that the host
//! socket has not accepted yet. It never grows past its capacity (the
//! `buf_alloc` advertised to the guest); memory is taken only as needed.

use std::io::{self, Write};

use super::packet::Payload;

/// The buffer is full: the guest sent more than the credit it was given.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

/// A FIFO byte buffer with a hard capacity.
#[derive(Debug)]
pub struct TxBuf {
    data: Vec<u8>,
    head: usize,
    cap: usize,
}

impl TxBuf {
    pub fn new(cap: usize) -> Self {
        TxBuf {
            data: Vec::new(),
            head: 0,
            cap,
        }
    }

    /// Bytes waiting.
    pub fn len(&self) -> usize {
        self.data.len() - self.head
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Append `payload[off..]`.
    pub fn push_payload(&mut self, payload: &Payload<'_>, off: usize) -> Result<(), Full> {
        let n = payload.len().saturating_sub(off);
        if self.len() + n > self.cap {
            return Err(Full);
        }
        self.compact();
        let at = self.data.len();
        self.data.resize(at + n, 0);
        let got = payload.copy_to(off, &mut self.data[at..]);
        self.data.truncate(at + got);
        Ok(())
    }

    /// Append raw bytes.
    pub fn push_bytes(&mut self, b: &[u8]) -> Result<(), Full> {
        if self.len() + b.len() > self.cap {
            return Err(Full);
        }
        self.compact();
        self.data.extend_from_slice(b);
        Ok(())
    }

    fn compact(&mut self) {
        if self.head > 0 {
            self.data.drain(..self.head);
            self.head = 0;
        }
    }

    /// Write as much as `w` takes; returns the bytes written. `WouldBlock`
    /// is not an error (0 or a partial count is returned).
    pub fn flush_to(&mut self, w: &mut impl Write) -> io::Result<usize> {
        let mut total = 0;
        while self.head < self.data.len() {
            match w.write(&self.data[self.head..]) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => {
                    self.head += n;
                    total += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if self.head == self.data.len() {
            self.data.clear();
            self.head = 0;
            // Give memory back once a burst is over.
            if self.data.capacity() > 64 * 1024 {
                self.data.shrink_to(64 * 1024);
            }
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Slow(Vec<u8>, usize);
    impl Write for Slow {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            if self.1 == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = b.len().min(self.1);
            self.1 -= n;
            self.0.extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bounded_fifo() {
        let mut t = TxBuf::new(8);
        t.push_bytes(b"abcde").unwrap();
        assert_eq!(t.push_bytes(b"fghi"), Err(Full));
        let mut w = Slow(Vec::new(), 3);
        assert_eq!(t.flush_to(&mut w).unwrap(), 3);
        assert_eq!(t.len(), 2);
        t.push_payload(&Payload::Owned(b"xyzfgh".to_vec()), 3)
            .unwrap();
        w.1 = 100;
        assert_eq!(t.flush_to(&mut w).unwrap(), 5);
        assert_eq!(w.0, b"abcdefgh");
        assert!(t.is_empty());
    }
}
