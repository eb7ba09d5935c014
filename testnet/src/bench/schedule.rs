//! Who sends what, and when.
//!
//! Closed loop: a sender sends as soon as its in-flight window allows. Open loop: the
//! total `--rate` is split evenly over the senders, each sender gets a fixed period
//! and a start offset (staggered so the senders do not fire in bursts), and message
//! `j` is *due* at `offset + j * period`. Latency is measured from the due time, so a
//! sender held up by a slow node counts the wait (no coordinated omission).

use std::time::Duration;

/// Splits `total` messages over `parts` senders; the first `total % parts` get one more.
pub fn split_total(total: u64, parts: usize) -> Vec<u64> {
    let parts_u = parts.max(1) as u64;
    (0..parts.max(1) as u64)
        .map(|p| total / parts_u + u64::from(p < total % parts_u))
        .collect()
}

/// Open-loop pacing of one sender.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pace {
    period_s: f64,
    offset_s: f64,
}

impl Pace {
    /// Pacing of sender `index` of `senders` for `rate` msgs/s in total; `None` when
    /// `rate` is 0 (closed loop).
    pub fn for_sender(rate: f64, senders: usize, index: usize) -> Option<Pace> {
        if !(rate > 0.0 && rate.is_finite()) || senders == 0 {
            return None;
        }
        let period_s = senders as f64 / rate;
        Some(Pace {
            period_s,
            offset_s: period_s * index as f64 / senders as f64,
        })
    }

    #[cfg(test)]
    pub fn period(&self) -> Duration {
        Duration::from_secs_f64(self.period_s)
    }

    /// When message `j` is due, relative to the load start.
    pub fn due(&self, j: u64) -> Duration {
        Duration::from_secs_f64(self.offset_s + self.period_s * j as f64)
    }

    /// How many messages are due strictly before `window` has passed.
    pub fn due_within(&self, window: Duration) -> u64 {
        let w = window.as_secs_f64();
        if w <= self.offset_s {
            return 0;
        }
        let n = ((w - self.offset_s) / self.period_s).ceil() as u64;
        // Guard against float rounding at the boundary.
        if n > 0 && self.due(n - 1) >= window {
            n - 1
        } else {
            n
        }
    }
}

/// The room of sender `sender`'s `j`-th message.
///
/// Each sender owns `per_sender` consecutive rooms starting at `sender * per_sender`
/// (wrapping), and walks them round-robin starting at its own index. With
/// `per_sender == rooms` this is `(sender + j) % rooms`, the NATS peer bench's order.
pub fn room_of(sender: usize, j: u64, rooms: usize, per_sender: usize) -> usize {
    let rooms = rooms.max(1);
    let k = per_sender.clamp(1, rooms);
    let within = ((sender as u64 + j) % k as u64) as usize;
    (sender * k + within) % rooms
}

/// The rooms sender `sender` ever sends to (the rooms it must join).
pub fn rooms_of(sender: usize, rooms: usize, per_sender: usize) -> Vec<usize> {
    let rooms = rooms.max(1);
    let k = per_sender.clamp(1, rooms);
    let mut v: Vec<usize> = (0..k).map(|i| (sender * k + i) % rooms).collect();
    v.sort_unstable();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_exact_and_even() {
        let v = split_total(200_000, 64);
        assert_eq!(v.len(), 64);
        assert_eq!(v.iter().sum::<u64>(), 200_000);
        assert!(v.iter().max().copied().unwrap_or(0) - v.iter().min().copied().unwrap_or(0) <= 1);
        assert_eq!(split_total(3, 5), vec![1, 1, 1, 0, 0]);
        assert_eq!(split_total(7, 0), vec![7]);
    }

    #[test]
    fn closed_loop_has_no_pace() {
        assert_eq!(Pace::for_sender(0.0, 64, 0), None);
        assert_eq!(Pace::for_sender(f64::NAN, 64, 0), None);
        assert_eq!(Pace::for_sender(100.0, 0, 0), None);
    }

    #[test]
    fn open_loop_adds_up_to_the_rate() {
        let (rate, senders) = (5000.0, 64);
        let window = Duration::from_secs(10);
        let total: u64 = (0..senders)
            .filter_map(|i| Pace::for_sender(rate, senders, i))
            .map(|p| p.due_within(window))
            .sum();
        assert!((49_990..=50_010).contains(&total), "total {total}");
        // Every message counted is due inside the window, the next one is not.
        for i in 0..senders {
            let p = Pace::for_sender(rate, senders, i).into_iter().next();
            let Some(p) = p else { continue };
            let n = p.due_within(window);
            assert!(n == 0 || p.due(n - 1) < window);
            assert!(p.due(n) >= window);
        }
    }

    #[test]
    fn senders_are_staggered() {
        let a = Pace::for_sender(1000.0, 4, 0);
        let b = Pace::for_sender(1000.0, 4, 1);
        let (Some(a), Some(b)) = (a, b) else {
            panic!("paced")
        };
        let close = |d: Duration, ms: u64| {
            let want = Duration::from_millis(ms);
            d.max(want) - d.min(want) < Duration::from_micros(1)
        };
        assert!(close(a.period(), 4));
        assert!(close(a.due(0), 0));
        assert!(close(b.due(0), 1));
        assert!(close(b.due(2), 9));
    }

    #[test]
    fn rooms_round_robin_like_the_nats_bench() {
        for s in 0..5 {
            for j in 0..20 {
                assert_eq!(room_of(s, j, 7, 7), (s + j as usize) % 7);
            }
        }
    }

    #[test]
    fn room_subsets_cover_rooms_evenly() {
        // 64 senders x 25 rooms each over 100 rooms: every room has 16 senders.
        let mut per_room = vec![0; 100];
        for s in 0..64 {
            let mine = rooms_of(s, 100, 25);
            assert_eq!(mine.len(), 25);
            for j in 0..100 {
                assert!(mine.contains(&room_of(s, j, 100, 25)));
            }
            for r in mine {
                per_room[r] += 1;
            }
        }
        assert!(per_room.iter().all(|&n| n == 16));
    }
}
