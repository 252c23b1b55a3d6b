//! Admission against leased budgets: a request of a route with a token budget is forwarded only
//! while this Envoy process's reservations for the route stay within the grant the operator
//! leased it (docs/design/usage.md, "Admission control").
//!
//! Units are this process's own: `reserved` is the cumulative sum of the estimates it admitted
//! for a route since it started (its *boot*), `granted` the cumulative amount the operator lets it
//! reserve. The operator computes each grant from what this process reported (reserved, the
//! reservations its counted answers settled, the grant it holds), so that a grant never needs a
//! call on the request path and a lost or late lease only makes admission stricter.
//!
//! Files, in the gateway Pod's shared usage directory (an emptyDir; the sidecar writes the first,
//! a thread of this module the second, each replaced whole by a rename):
//!
//! ```text
//! grants:        boot <boot>\nretry <seconds>\n<route> <granted> <cap> <resets-at|->\n...
//! reservations:  boot <boot>\n<route> <reserved> <granted> <refused>\n...
//! ```
//!
//! A route listed in `grants` is *leased*: its requests are admitted against the grant. A grant
//! file of another boot (a previous Envoy process of the Pod) grants nothing: its routes are
//! refused until the operator leases this process. A route not listed is not budgeted here.

use std::collections::HashMap;

/// One route's lease in this process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lease {
    /// What this process may reserve in all, since it started.
    pub granted: u64,
    /// What it reserved (admitted estimates), since it started.
    pub reserved: u64,
    /// The completion tokens written into a request that sets no limit (the route's cap).
    pub cap: u64,
    /// What it refused (estimates that did not fit): demand the operator weighs grants by.
    pub refused: u64,
    /// When the budget's period ends (RFC 3339), for refusals; empty when not said.
    pub resets_at: String,
}

/// Admission's state: the boot id and each leased route.
#[derive(Debug)]
pub struct Admission {
    boot: String,
    routes: HashMap<String, Lease>,
    /// Seconds a refused client is told to wait (the operator's lease interval).
    retry_after: u64,
}

/// What admission says of a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The route is not leased: no budget is held here.
    NotLeased,
    /// Admitted; this much is reserved.
    Admitted(u64),
    /// Refused: the estimate does not fit in what is left of the grant.
    Refused {
        left: u64,
        retry_after: u64,
        resets_at: String,
    },
}

impl Admission {
    pub fn new(boot: String) -> Admission {
        Admission {
            boot,
            routes: HashMap::new(),
            retry_after: 1,
        }
    }

    pub fn boot(&self) -> &str {
        &self.boot
    }

    /// Seconds a refused client is told to wait.
    pub fn retry_after(&self) -> u64 {
        self.retry_after
    }

    /// The cap written into a request of `route` that sets no completion limit, if leased.
    pub fn cap(&self, route: &str) -> Option<u64> {
        self.routes.get(route).map(|l| l.cap)
    }

    /// Admits a request of `route` estimated at `estimate` tokens, or refuses it.
    pub fn admit(&mut self, route: &str, estimate: u64) -> Verdict {
        let Some(lease) = self.routes.get_mut(route) else {
            return Verdict::NotLeased;
        };
        match lease.reserved.checked_add(estimate) {
            Some(total) if total <= lease.granted => {
                lease.reserved = total;
                Verdict::Admitted(estimate)
            }
            _ => {
                lease.refused = lease.refused.saturating_add(estimate);
                Verdict::Refused {
                    left: lease.granted.saturating_sub(lease.reserved),
                    retry_after: self.retry_after,
                    resets_at: lease.resets_at.clone(),
                }
            }
        }
    }

    /// Takes the grants file's text. A grant of this boot replaces the one held (a smaller one
    /// takes back what was not reserved: the operator counts the larger until this process
    /// reports the smaller); a route no longer listed is no longer leased; a file of another boot
    /// leases its routes with nothing granted. Malformed lines are skipped (the route stays as it
    /// was).
    pub fn load(&mut self, text: &str) {
        let mut lines = text.lines();
        let mut ours = false;
        let mut listed: HashMap<String, (u64, u64, String)> = HashMap::new();
        for line in lines.by_ref() {
            let mut words = line.split_ascii_whitespace();
            match (words.next(), words.next(), words.next(), words.next()) {
                (Some("boot"), Some(boot), None, None) => ours = boot == self.boot,
                (Some("retry"), Some(s), None, None) => {
                    if let Ok(s) = s.parse() {
                        self.retry_after = s;
                    }
                }
                (Some(route), Some(granted), Some(cap), resets) => {
                    let resets = resets.filter(|r| *r != "-").unwrap_or_default();
                    if let (Ok(g), Ok(c)) = (granted.parse(), cap.parse()) {
                        listed.insert(route.to_string(), (g, c, resets.to_string()));
                    } else if let Some(l) = self.routes.get(route) {
                        listed.insert(route.to_string(), (l.granted, l.cap, l.resets_at.clone()));
                    }
                }
                _ => {}
            }
        }
        self.routes.retain(|route, _| listed.contains_key(route));
        for (route, (granted, cap, resets_at)) in listed {
            let lease = self.routes.entry(route).or_default();
            if ours {
                lease.granted = granted;
            }
            lease.cap = cap;
            lease.resets_at = resets_at;
        }
    }

    /// The reservations file's text: this boot, and each leased route's reservations, grant and
    /// refusals.
    pub fn reservations(&self) -> String {
        let mut routes: Vec<_> = self.routes.iter().collect();
        routes.sort_by(|a, b| a.0.cmp(b.0));
        let mut out = format!("boot {}\n", self.boot);
        for (route, l) in routes {
            out.push_str(&format!(
                "{route} {} {} {}\n",
                l.reserved, l.granted, l.refused
            ));
        }
        out
    }
}

/// The global state and the thread that exchanges it with the sidecar (not in unit tests: it
/// runs in Envoy's process).
#[cfg(not(test))]
pub mod shared {
    use std::path::{Path, PathBuf};
    use std::sync::{LazyLock, Mutex, MutexGuard, Once};
    use std::time::Duration;

    use super::Admission;

    static STATE: LazyLock<Mutex<Admission>> = LazyLock::new(|| Mutex::new(Admission::new(boot())));
    static STARTED: Once = Once::new();

    /// How often the grants are looked at and the reservations written.
    const EVERY: Duration = Duration::from_millis(200);

    /// The state (a panic elsewhere never poisons admission for good).
    pub fn state() -> MutexGuard<'static, Admission> {
        STATE.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A boot id: random per process (hashed from the process id, the time and the standard
    /// library's per-process random keys).
    fn boot() -> String {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default(),
        );
        format!("{:016x}", h.finish())
    }

    /// Starts the exchange with the sidecar in `dir`, once per process.
    pub fn start(dir: &str) {
        let dir = PathBuf::from(dir);
        STARTED.call_once(move || {
            let spawned = std::thread::Builder::new()
                .name("llmroute-admission".into())
                .spawn(move || exchange(&dir));
            // Without the thread, no grant is ever loaded: leased routes are refused.
            drop(spawned);
        });
    }

    fn exchange(dir: &Path) {
        let (grants, reservations) = (dir.join("grants"), dir.join("reservations"));
        let tmp = dir.join(".reservations.tmp");
        let mut seen: Option<(std::time::SystemTime, u64)> = None;
        let mut written = String::new();
        loop {
            if let Ok(meta) = std::fs::metadata(&grants) {
                let stamp = (meta.modified().unwrap_or(std::time::UNIX_EPOCH), meta.len());
                if seen != Some(stamp)
                    && let Ok(text) = std::fs::read_to_string(&grants)
                {
                    state().load(&text);
                    seen = Some(stamp);
                }
            }
            let text = state().reservations();
            if text != written
                && std::fs::write(&tmp, &text).is_ok()
                && std::fs::rename(&tmp, &reservations).is_ok()
            {
                written = text;
            }
            std::thread::sleep(EVERY);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leased(text: &str) -> Admission {
        let mut a = Admission::new("b1".into());
        a.load(text);
        a
    }

    #[test]
    fn requests_are_admitted_while_their_reservations_fit_the_grant() {
        let mut a = leased("boot b1\nretry 2\nchat 1000 256 2027-01-01T00:00:00Z\n");
        assert_eq!(a.cap("chat"), Some(256));
        assert_eq!(a.admit("chat", 600), Verdict::Admitted(600));
        assert_eq!(
            a.admit("chat", 600),
            Verdict::Refused {
                left: 400,
                retry_after: 2,
                resets_at: "2027-01-01T00:00:00Z".into(),
            }
        );
        assert_eq!(a.admit("chat", 400), Verdict::Admitted(400));
        assert_eq!(a.admit("other", 1 << 40), Verdict::NotLeased);
        assert_eq!(a.reservations(), "boot b1\nchat 1000 1000 600\n");
        // An estimate that would overflow is refused, never wrapped.
        assert!(matches!(a.admit("chat", u64::MAX), Verdict::Refused { .. }));
    }

    #[test]
    fn a_smaller_grant_takes_back_what_was_not_reserved_and_another_boot_s_grant_nothing() {
        let mut a = leased("boot b1\nchat 1000 256\n");
        assert_eq!(a.admit("chat", 400), Verdict::Admitted(400));
        a.load("boot b1\nchat 500 256\n");
        assert!(matches!(
            a.admit("chat", 101),
            Verdict::Refused { left: 100, .. }
        ));
        assert_eq!(a.admit("chat", 100), Verdict::Admitted(100));
        // Below what is reserved already: nothing more until it grows again.
        a.load("boot b1\nchat 300 256\n");
        assert!(matches!(
            a.admit("chat", 0),
            Verdict::Refused { left: 0, .. }
        ));
        assert!(matches!(
            a.admit("chat", 1),
            Verdict::Refused { left: 0, .. }
        ));
        // A previous process's file: the route is leased, nothing granted beyond what was.
        let mut fresh = leased("boot b0\nchat 1000000 256\n");
        assert!(matches!(fresh.admit("chat", 1), Verdict::Refused { .. }));
        // Unlisted: no longer budgeted here; listed again: reservations start from zero.
        a.load("boot b1\n");
        assert_eq!(a.admit("chat", 1 << 30), Verdict::NotLeased);
        a.load("boot b1\nchat 10 1\nbad line x\nchat2 x 1\n");
        assert_eq!(a.reservations(), "boot b1\nchat 0 10 0\n");
    }
}
