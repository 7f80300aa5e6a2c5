//! The read buffer under the protocols' stream decoders (gearman packets,
//! Nagios worker messages).

/// Consumed bytes a buffer may keep in front of the rest before moving it.
const COMPACT_AFTER: usize = 64 * 1024;

/// Bytes read from a stream, of which a decoder has consumed a front part.
/// Consuming only moves a cursor: the bytes after a decoded message are not
/// moved down each time one is taken, only now and then when more arrive.
#[derive(Debug, Default)]
pub(crate) struct ReadBuf {
    buf: Vec<u8>,
    /// Start of the bytes not consumed yet.
    start: usize,
}

impl ReadBuf {
    /// Append bytes read from the stream. The consumed front goes first when
    /// it is all there is, or when it is past [`COMPACT_AFTER`] and longer
    /// than what is left (so each byte moved was paid for by one consumed).
    pub(crate) fn extend(&mut self, data: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > COMPACT_AFTER && self.start * 2 > self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The bytes not consumed yet.
    pub(crate) fn unread(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Consume the first `n` unread bytes.
    pub(crate) fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.buf.len() - self.start);
        self.start += n;
    }

    /// What the buffer holds room for, read and consumed bytes together.
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.buf.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_consumed_front_goes_once_it_outweighs_the_rest() {
        let mut b = ReadBuf::default();
        b.extend(&[1; COMPACT_AFTER + 2]);
        b.consume(COMPACT_AFTER + 1);
        b.extend(&[2]);
        // Moved down: only the unread byte and the new one are left.
        assert_eq!((b.start, b.buf.len()), (0, 2));
        assert_eq!(b.unread(), [1, 2]);
        b.consume(2);
        b.extend(&[3]);
        assert_eq!((b.start, b.unread()), (0, &[3][..]));
    }

    #[test]
    fn a_front_shorter_than_the_rest_stays() {
        let mut b = ReadBuf::default();
        b.extend(&[1; 3 * COMPACT_AFTER]);
        b.consume(COMPACT_AFTER + 1);
        b.extend(&[2]);
        assert_eq!(b.start, COMPACT_AFTER + 1);
        assert_eq!(b.unread().len(), 2 * COMPACT_AFTER);
    }
}
