//! The calendar budgets are counted in: the wall clock, or, for tests of period boundaries, a
//! clock that starts at a chosen instant and runs at the wall clock's pace (`llmroute run
//! --test-clock-start`, hidden). Only budget periods read it (which period a count goes into,
//! when a budget resets); certificates, leases and probe times always read the wall clock.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, shifted by a fixed offset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Clock {
    offset_ms: i64,
}

impl Clock {
    /// The wall clock.
    pub fn system() -> Clock {
        Clock::default()
    }

    /// A clock that reads `start_ms` now and advances with the wall clock.
    pub fn starting_at(start_ms: u64) -> Clock {
        Clock {
            offset_ms: start_ms as i64 - wall_ms() as i64,
        }
    }

    /// The time now, in milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        (wall_ms() as i64).saturating_add(self.offset_ms).max(0) as u64
    }
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_started_clock_reads_its_start_and_advances() {
        let start = 1_800_000_000_000;
        let clock = Clock::starting_at(start);
        let first = clock.now_ms();
        assert!((start..start + 1_000).contains(&first), "{first}");
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(clock.now_ms() >= first + 20);
        let wall = Clock::system().now_ms();
        assert!(wall.abs_diff(wall_ms()) < 1_000);
    }
}
