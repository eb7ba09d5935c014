//! The text of a bench message says who sent it, which one it is, and when it was due.
//!
//! Layout (ASCII, so it is valid UTF-8 whatever the size):
//! `TTTTTTTTTTTTTTTT SSSSSSSS QQQQQQQQ xxxx…` without the spaces: 16 hex digits of the
//! scheduled send time in µs since the load started, 8 hex digits of the sender index,
//! 8 hex digits of the sender's sequence number, then `x` up to the requested size.
//! Subscribers decode it to measure send→delivery latency and to match deliveries to
//! acked sends (lost and duplicate deliveries).

/// Bytes taken by the header; the smallest allowed `--size`.
pub const HEADER_LEN: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Scheduled send time, µs since the load started.
    pub sent_us: u64,
    pub sender: u32,
    pub seq: u32,
}

impl Stamp {
    /// Identifies the message across the whole run.
    pub fn key(&self) -> u64 {
        (u64::from(self.sender) << 32) | u64::from(self.seq)
    }

    /// The message text, exactly `max(size, HEADER_LEN)` bytes.
    pub fn encode(&self, size: usize) -> String {
        let mut text = String::with_capacity(size.max(HEADER_LEN));
        use std::fmt::Write as _;
        let _ = write!(
            text,
            "{:016x}{:08x}{:08x}",
            self.sent_us, self.sender, self.seq
        );
        for _ in HEADER_LEN..size {
            text.push('x');
        }
        text
    }

    /// Reads a header written by [`Stamp::encode`]; `None` for any other text.
    pub fn decode(text: &str) -> Option<Stamp> {
        let head = text.get(..HEADER_LEN)?;
        // from_str_radix would also accept a leading '+'.
        if !head.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        Some(Stamp {
            sent_us: u64::from_str_radix(&head[..16], 16).ok()?,
            sender: u32::from_str_radix(&head[16..24], 16).ok()?,
            seq: u32::from_str_radix(&head[24..32], 16).ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let s = Stamp {
            sent_us: 123_456_789,
            sender: 63,
            seq: 4_000_000_000,
        };
        let text = s.encode(200);
        assert_eq!(text.len(), 200);
        assert!(text.starts_with("00000000075bcd15"));
        assert_eq!(Stamp::decode(&text), Some(s));
        assert_eq!(s.key(), (63u64 << 32) | 4_000_000_000);
    }

    #[test]
    fn extremes_and_minimum_size() {
        let s = Stamp {
            sent_us: u64::MAX,
            sender: u32::MAX,
            seq: 0,
        };
        let text = s.encode(1);
        assert_eq!(text.len(), HEADER_LEN);
        assert_eq!(Stamp::decode(&text), Some(s));
    }

    #[test]
    fn foreign_text_is_rejected() {
        assert_eq!(Stamp::decode("hello"), None);
        assert_eq!(Stamp::decode(""), None);
        assert_eq!(Stamp::decode("+0000000075bcd15000000000000000100"), None);
        assert_eq!(Stamp::decode("zz00000075bcd1500000000000000001 hi"), None);
        // Multi-byte UTF-8 straddling the header boundary must not panic.
        let odd = format!("{}é", "0".repeat(31));
        assert_eq!(Stamp::decode(&odd), None);
    }
}
