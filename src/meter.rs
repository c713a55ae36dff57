//! The read meter behind STATUS's `reads_last_hour`: item reads as the backends spend them
//! (start-up, SIGHUP, REFRESH and timer alike). It is process-wide because the quota it
//! tracks is the token's, not one caller's; it lives on the ground floor so a backend can
//! count into it without knowing who reads it.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

/// The window of `reads_last_hour`.
const HOUR: Duration = Duration::from_secs(3600);

/// Item reads spent, with when.
pub struct ReadMeter {
    events: Mutex<VecDeque<(std::time::Instant, u64)>>,
}

/// Every item read of this process (the `op` backend adds to it).
pub static READS: ReadMeter = ReadMeter { events: Mutex::new(VecDeque::new()) };

impl ReadMeter {
    pub fn add(&self, reads: u64) {
        let now = std::time::Instant::now();
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        prune(&mut events, now);
        events.push_back((now, reads));
    }

    pub fn last_hour(&self) -> u64 {
        let now = std::time::Instant::now();
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        prune(&mut events, now);
        events.iter().map(|(_, n)| n).sum()
    }
}

fn prune(events: &mut VecDeque<(std::time::Instant, u64)>, now: std::time::Instant) {
    while events.front().is_some_and(|(at, _)| now.duration_since(*at) > HOUR) {
        events.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meter_sums_reads() {
        let meter = ReadMeter { events: Mutex::new(VecDeque::new()) };
        meter.add(3);
        meter.add(4);
        assert_eq!(meter.last_hour(), 7);
    }
}
