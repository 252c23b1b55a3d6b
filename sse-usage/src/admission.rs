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
//! grants:        boot <boot>\nretry <seconds>\n<route> <granted> <cap> <resets-at|->\n
//!                @rate <route> <requests/min> <tokens/min> <cap>\n...
//! reservations:  boot <boot>\n<route> <reserved> <granted> <refused>\n
//!                @rate <route> <requests> <requests refused> <tokens> <tokens refused>\n...
//! refunds:       boot <boot>\n<route> <tokens>\n...      (the sidecar's, as it counts answers)
//! ```
//!
//! A route listed in `grants` is *leased*: its requests are admitted against the grant. A grant
//! file of another boot (a previous Envoy process of the Pod) grants nothing: its routes are
//! refused until the operator leases this process. A route not listed is not budgeted here.
//! (`@` starts no route name: they are DNS labels.)
//!
//! A route's rate limits are this process's shares of them, per minute, each held as a token
//! bucket of a minute's share refilled continuously ([`Bucket`]). A request takes one request and
//! its estimate in tokens; what the answer did not use comes back as the sidecar counts it
//! (`refunds`, cumulative per boot).
//!
//! A backend's rate limits are keyed `<route>/<backend>` in the same lines (`/` is in no route
//! name). They are checked per attempt, in the backend's account listener
//! ([`Admission::admit_backend`]): a backend over its share answers that attempt 429
//! `RateLimited`, which moves the request on to the next backend like a provider's own 429. A
//! route whose backends have limits reserves its requests' estimates at the front even without a
//! limit or budget of its own, so that the sidecar refunds what the answers did not use to the
//! backend that served them.

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

/// A token bucket of `per_minute` refilled continuously, holding at most a minute's worth
/// (no limit when `per_minute` is 0).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Bucket {
    pub per_minute: u64,
    level: f64,
    at: f64,
}

impl Bucket {
    fn new(per_minute: u64, now: f64) -> Bucket {
        Bucket {
            per_minute,
            level: per_minute as f64,
            at: now,
        }
    }

    fn refill(&mut self, now: f64) {
        let gained = (now - self.at).max(0.0) * self.per_minute as f64 / 60.0;
        self.level = (self.level + gained).min(self.per_minute as f64);
        self.at = now;
    }

    /// Seconds until `n` fit (None: never, more than a minute's share).
    fn wait(&self, n: u64) -> Option<f64> {
        if self.per_minute == 0 || n as f64 <= self.level {
            return Some(0.0);
        }
        (n <= self.per_minute).then(|| (n as f64 - self.level) * 60.0 / self.per_minute as f64)
    }

    /// Refilled at the old share until `now`, then the new share, holding at most a minute of it.
    fn reshare(&mut self, per_minute: u64, now: f64) {
        self.refill(now);
        self.per_minute = per_minute;
        self.level = self.level.min(per_minute as f64);
    }

    fn take(&mut self, n: u64) {
        if self.per_minute > 0 {
            self.level -= n as f64;
        }
    }

    fn give(&mut self, n: u64) {
        self.level = (self.level + n as f64).min(self.per_minute as f64);
    }
}

/// One route's rate limits in this process, and what it admitted and refused under them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rates {
    pub requests: Bucket,
    pub tokens: Bucket,
    pub cap: u64,
    pub admitted_requests: u64,
    pub refused_requests: u64,
    pub admitted_tokens: u64,
    pub refused_tokens: u64,
    /// Refunds taken so far (the sidecar's cumulative count).
    refunded: u64,
    /// Listed by a grants file of another boot: nothing is admitted until this one is leased.
    pending: bool,
    /// Shares set (the buckets started).
    started: bool,
}

impl Rates {
    /// The refusal of a request estimated at `estimate` tokens at `now`, if it does not fit
    /// (counted as refused); None when it fits (nothing taken yet).
    fn check(&mut self, estimate: u64, now: f64, retry_after: u64) -> Option<Verdict> {
        if self.pending {
            self.refused_requests += 1;
            self.refused_tokens = self.refused_tokens.saturating_add(estimate);
            return Some(Verdict::RateLimited {
                kind: "requests",
                share: 0,
                retry_after,
            });
        }
        self.requests.refill(now);
        self.tokens.refill(now);
        for (kind, n) in [("requests", 1), ("tokens", estimate)] {
            let bucket = if kind == "requests" {
                &self.requests
            } else {
                &self.tokens
            };
            let wait = bucket.wait(n);
            if wait == Some(0.0) {
                continue;
            }
            let share = bucket.per_minute;
            if kind == "requests" {
                self.refused_requests += 1;
            } else {
                self.refused_tokens = self.refused_tokens.saturating_add(estimate);
            }
            let retry_after = wait.map_or(retry_after.max(60), |w| w.ceil().max(1.0) as u64);
            return Some(Verdict::RateLimited {
                kind,
                share,
                retry_after,
            });
        }
        None
    }

    /// Takes an admitted request of `estimate` tokens.
    fn take(&mut self, estimate: u64) {
        self.requests.take(1);
        self.tokens.take(estimate);
        self.admitted_requests += 1;
        self.admitted_tokens = self.admitted_tokens.saturating_add(estimate);
    }
}

/// Admission's state: the boot id and each leased route.
#[derive(Debug)]
pub struct Admission {
    boot: String,
    routes: HashMap<String, Lease>,
    rates: HashMap<String, Rates>,
    /// Every reservation written to the usage log per route in this process, leased or not: a
    /// lease that starts counts from it, so that `reserved` is always the sum the sidecar settles.
    admitted: HashMap<String, u64>,
    /// Seconds a refused client is told to wait (the operator's lease interval).
    retry_after: u64,
    /// Routes whose backends have rate limits, and the cap their leases name where tokens are
    /// limited.
    backend_rated: HashMap<String, Option<u64>>,
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
    /// Refused: over this process's share of a rate limit (`requests` or `tokens` per minute).
    RateLimited {
        kind: &'static str,
        share: u64,
        retry_after: u64,
    },
}

impl Admission {
    pub fn new(boot: String) -> Admission {
        Admission {
            boot,
            routes: HashMap::new(),
            rates: HashMap::new(),
            admitted: HashMap::new(),
            retry_after: 1,
            backend_rated: HashMap::new(),
        }
    }

    pub fn boot(&self) -> &str {
        &self.boot
    }

    /// Seconds a refused client is told to wait.
    pub fn retry_after(&self) -> u64 {
        self.retry_after
    }

    /// The cap written into a request of `route` that sets no completion limit, if the route
    /// has a leased budget or a tokens-per-minute limit.
    pub fn cap(&self, route: &str) -> Option<u64> {
        let lease = self.routes.get(route).map(|l| l.cap);
        let rates = self
            .rates
            .get(route)
            .filter(|r| r.tokens.per_minute > 0)
            .map(|r| r.cap);
        let backends = self.backend_rated.get(route).copied().flatten();
        lease.into_iter().chain(rates).chain(backends).min()
    }

    /// Admits a request of `route` estimated at `estimate` tokens at `now` (seconds of a
    /// monotonic clock), or refuses it: rate limits first, then the budget; nothing is taken
    /// unless all admit it. A route with rate-limited backends only is admitted here (its
    /// estimate reserved for the refunds), and checked per backend by [`Admission::admit_backend`].
    pub fn admit(&mut self, route: &str, estimate: u64, now: f64) -> Verdict {
        let lease = self.routes.get_mut(route);
        let mut rates = self.rates.get_mut(route);
        if lease.is_none() && rates.is_none() && !self.backend_rated.contains_key(route) {
            return Verdict::NotLeased;
        }
        if let Some(r) = rates.as_deref_mut()
            && let Some(refusal) = r.check(estimate, now, self.retry_after)
        {
            return refusal;
        }
        if let Some(lease) = lease {
            match lease.reserved.checked_add(estimate) {
                Some(total) if total <= lease.granted => lease.reserved = total,
                _ => {
                    lease.refused = lease.refused.saturating_add(estimate);
                    return Verdict::Refused {
                        left: lease.granted.saturating_sub(lease.reserved),
                        retry_after: self.retry_after,
                        resets_at: lease.resets_at.clone(),
                    };
                }
            }
        }
        if let Some(r) = rates {
            r.take(estimate);
        }
        let admitted = self.admitted.entry(route.to_string()).or_default();
        *admitted = admitted.saturating_add(estimate);
        Verdict::Admitted(estimate)
    }

    /// Admits one attempt of a request estimated at `estimate` tokens at a backend's rate limits
    /// (`key`: `<route>/<backend>`), or refuses it. A backend without limits admits everything
    /// (its reservation is the route's, made at the front).
    pub fn admit_backend(&mut self, key: &str, estimate: u64, now: f64) -> Verdict {
        let Some(r) = self.rates.get_mut(key) else {
            return Verdict::NotLeased;
        };
        if let Some(refusal) = r.check(estimate, now, self.retry_after) {
            return refusal;
        }
        r.take(estimate);
        Verdict::Admitted(estimate)
    }

    /// Takes the sidecar's refunds file: tokens reserved and not used by answers it counted,
    /// cumulative for this boot, back into the routes' token buckets.
    pub fn refund(&mut self, text: &str) {
        let mut lines = text.lines();
        if lines.next().and_then(|l| l.strip_prefix("boot ")) != Some(self.boot.as_str()) {
            return;
        }
        for line in lines {
            let mut w = line.split_ascii_whitespace();
            let (Some(route), Some(Ok(total))) = (w.next(), w.next().map(str::parse::<u64>)) else {
                continue;
            };
            if let Some(r) = self.rates.get_mut(route)
                && total > r.refunded
            {
                r.tokens.give(total - r.refunded);
                r.refunded = total;
            }
        }
    }

    /// Takes the grants file's text. A grant of this boot replaces the one held (a smaller one
    /// takes back what was not reserved: the operator counts the larger until this process
    /// reports the smaller); a route no longer listed is no longer leased; a file of another boot
    /// leases its routes with nothing granted. Malformed lines are skipped (the route stays as it
    /// was).
    pub fn load(&mut self, text: &str, now: f64) {
        let mut lines = text.lines();
        let mut ours = false;
        let mut listed: HashMap<String, (u64, u64, String)> = HashMap::new();
        let mut rated: HashMap<String, (u64, u64, u64)> = HashMap::new();
        for line in lines.by_ref() {
            let mut words = line.split_ascii_whitespace();
            match (words.next(), words.next(), words.next(), words.next()) {
                (Some("boot"), Some(boot), None, None) => ours = boot == self.boot,
                (Some("retry"), Some(s), None, None) => {
                    if let Ok(s) = s.parse() {
                        self.retry_after = s;
                    }
                }
                (Some("@rate"), Some(route), Some(rpm), Some(tpm)) => {
                    let cap = words.next().and_then(|c| c.parse().ok());
                    if let (Ok(rpm), Ok(tpm), Some(cap)) = (rpm.parse(), tpm.parse(), cap) {
                        rated.insert(route.to_string(), (rpm, tpm, cap));
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
            let before = self.admitted.get(&route).copied().unwrap_or(0);
            let lease = self.routes.entry(route).or_insert_with(|| Lease {
                reserved: before,
                ..Lease::default()
            });
            if ours {
                lease.granted = granted;
            }
            lease.cap = cap;
            lease.resets_at = resets_at;
        }
        // Rates: a share of another boot is none (every request refused until leased).
        self.rates.retain(|route, _| rated.contains_key(route));
        self.backend_rated.clear();
        for (key, (_, tpm, cap)) in &rated {
            if let Some((route, _)) = key.split_once('/') {
                let held = self.backend_rated.entry(route.to_string()).or_default();
                // The cap bounds the estimate only where tokens are limited.
                if *tpm > 0 {
                    *held = Some(held.map_or(*cap, |c| c.min(*cap)));
                }
            }
        }
        for (route, (rpm, tpm, cap)) in rated {
            let r = self.rates.entry(route).or_default();
            r.cap = cap;
            r.pending = !ours;
            if !ours {
                continue;
            }
            if r.started {
                // A new share: what the bucket holds carries over, never above a minute of it.
                r.requests.reshare(rpm, now);
                r.tokens.reshare(tpm, now);
            } else {
                (r.requests, r.tokens, r.started) =
                    (Bucket::new(rpm, now), Bucket::new(tpm, now), true);
            }
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
        let mut rates: Vec<_> = self.rates.iter().collect();
        rates.sort_by(|a, b| a.0.cmp(b.0));
        for (route, r) in rates {
            out.push_str(&format!(
                "@rate {route} {} {} {} {}\n",
                r.admitted_requests, r.refused_requests, r.admitted_tokens, r.refused_tokens
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

    /// Seconds of the process's monotonic clock (the buckets' time).
    pub fn now() -> f64 {
        static START: LazyLock<std::time::Instant> = LazyLock::new(std::time::Instant::now);
        START.elapsed().as_secs_f64()
    }

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
        let refunds = dir.join("refunds");
        let tmp = dir.join(".reservations.tmp");
        let mut seen: Option<(std::time::SystemTime, u64)> = None;
        let mut refunds_seen: Option<(std::time::SystemTime, u64)> = None;
        let mut written = String::new();
        loop {
            if let Ok(meta) = std::fs::metadata(&grants) {
                let stamp = (meta.modified().unwrap_or(std::time::UNIX_EPOCH), meta.len());
                if seen != Some(stamp)
                    && let Ok(text) = std::fs::read_to_string(&grants)
                {
                    state().load(&text, now());
                    seen = Some(stamp);
                }
            }
            if let Ok(meta) = std::fs::metadata(&refunds) {
                let stamp = (meta.modified().unwrap_or(std::time::UNIX_EPOCH), meta.len());
                if refunds_seen != Some(stamp)
                    && let Ok(text) = std::fs::read_to_string(&refunds)
                {
                    state().refund(&text);
                    refunds_seen = Some(stamp);
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
        a.load(text, 0.0);
        a
    }

    #[test]
    fn requests_are_admitted_while_their_reservations_fit_the_grant() {
        let mut a = leased("boot b1\nretry 2\nchat 1000 256 2027-01-01T00:00:00Z\n");
        assert_eq!(a.cap("chat"), Some(256));
        assert_eq!(a.admit("chat", 600, 0.0), Verdict::Admitted(600));
        assert_eq!(
            a.admit("chat", 600, 0.0),
            Verdict::Refused {
                left: 400,
                retry_after: 2,
                resets_at: "2027-01-01T00:00:00Z".into(),
            }
        );
        assert_eq!(a.admit("chat", 400, 0.0), Verdict::Admitted(400));
        assert_eq!(a.admit("other", 1 << 40, 0.0), Verdict::NotLeased);
        assert_eq!(a.reservations(), "boot b1\nchat 1000 1000 600\n");
        // An estimate that would overflow is refused, never wrapped.
        assert!(matches!(
            a.admit("chat", u64::MAX, 0.0),
            Verdict::Refused { .. }
        ));
    }

    #[test]
    fn rate_shares_are_buckets_of_a_minute_refilled_and_refunded() {
        let mut a = Admission::new("b1".into());
        a.load("boot b1\n@rate chat 6 1000 64\n", 0.0);
        assert_eq!(a.cap("chat"), Some(64));
        for _ in 0..6 {
            assert_eq!(a.admit("chat", 10, 0.0), Verdict::Admitted(10));
        }
        // The seventh request waits for a tenth of a minute.
        assert_eq!(
            a.admit("chat", 10, 1.0),
            Verdict::RateLimited {
                kind: "requests",
                share: 6,
                retry_after: 9
            }
        );
        assert_eq!(a.admit("chat", 10, 10.0), Verdict::Admitted(10));
        // Tokens (no request limit): 860 used of 1000; 200 waits, until the sidecar refunds 150.
        a.load("boot b1\n@rate chat 6 1000 64\n@rate tok 0 1000 64\n", 20.0);
        assert_eq!(a.admit("tok", 860, 20.0), Verdict::Admitted(860));
        assert!(matches!(
            a.admit("tok", 200, 20.0),
            Verdict::RateLimited {
                kind: "tokens",
                share: 1000,
                retry_after: 4
            }
        ));
        a.refund("boot b1\ntok 150\n");
        a.refund("boot b1\ntok 150\n");
        a.refund("boot b0\ntok 9999\n");
        assert_eq!(a.admit("tok", 200, 20.0), Verdict::Admitted(200));
        assert!(matches!(
            a.admit("tok", 100, 20.0),
            Verdict::RateLimited { .. }
        ));
        // More than a minute's share never fits: retried after a lease, not spun on.
        assert!(matches!(
            a.admit("tok", 5000, 80.0),
            Verdict::RateLimited {
                kind: "tokens",
                retry_after: 60,
                ..
            }
        ));
        // A smaller share keeps what the bucket holds, never above the new share.
        a.load("boot b1\n@rate chat 2 0 64\n", 200.0);
        assert_eq!(a.admit("chat", 1, 200.0), Verdict::Admitted(1));
        assert_eq!(a.admit("chat", 1, 200.0), Verdict::Admitted(1));
        assert!(matches!(
            a.admit("chat", 1, 200.0),
            Verdict::RateLimited { .. }
        ));
        assert_eq!(a.reservations(), "boot b1\n@rate chat 9 2 72 0\n");
        // Another process's shares: refused until leased.
        let mut fresh = Admission::new("b2".into());
        fresh.load("boot b1\n@rate chat 600 0 64\n", 0.0);
        assert!(matches!(
            fresh.admit("chat", 1, 0.0),
            Verdict::RateLimited { share: 0, .. }
        ));
    }

    #[test]
    fn a_backend_s_share_refuses_its_attempts_and_the_route_reserves_for_its_refunds() {
        let mut a = Admission::new("b1".into());
        a.load(
            "boot b1\n@rate chat/free 2 0 64\n@rate chat/paid 0 1000 128\n",
            0.0,
        );
        // The route has no limit of its own: admitted (reserved for the refunds), capped by the
        // tokens-limited backend's cap.
        assert_eq!(a.cap("chat"), Some(128));
        assert_eq!(a.admit("chat", 100, 0.0), Verdict::Admitted(100));
        assert_eq!(a.admit("other", 100, 0.0), Verdict::NotLeased);
        assert_eq!(
            a.admit_backend("chat/free", 100, 0.0),
            Verdict::Admitted(100)
        );
        assert_eq!(
            a.admit_backend("chat/free", 100, 0.0),
            Verdict::Admitted(100)
        );
        assert_eq!(
            a.admit_backend("chat/free", 100, 1.0),
            Verdict::RateLimited {
                kind: "requests",
                share: 2,
                retry_after: 29
            }
        );
        assert_eq!(
            a.admit_backend("chat/paid", 900, 1.0),
            Verdict::Admitted(900)
        );
        assert!(matches!(
            a.admit_backend("chat/paid", 200, 1.0),
            Verdict::RateLimited { kind: "tokens", .. }
        ));
        a.refund("boot b1\nchat/paid 500\n");
        assert_eq!(
            a.admit_backend("chat/paid", 200, 1.0),
            Verdict::Admitted(200)
        );
        assert_eq!(
            a.admit_backend("chat/none", 1 << 40, 1.0),
            Verdict::NotLeased
        );
        assert_eq!(
            a.reservations(),
            "boot b1\n@rate chat/free 2 1 200 0\n@rate chat/paid 2 0 1100 200\n"
        );
        // Backends without a tokens limit put no cap on the route.
        a.load("boot b1\n@rate chat/free 2 0 64\n", 2.0);
        assert_eq!(a.cap("chat"), None);
        a.load("boot b1\n", 3.0);
        assert_eq!(a.admit("chat", 100, 3.0), Verdict::NotLeased);
    }

    #[test]
    fn a_budget_refusal_takes_nothing_of_the_rates() {
        let mut a = Admission::new("b1".into());
        a.load("boot b1\nchat 100 64 -\n@rate chat 2 0 64\n", 0.0);
        assert!(matches!(a.admit("chat", 150, 0.0), Verdict::Refused { .. }));
        assert_eq!(a.admit("chat", 50, 0.0), Verdict::Admitted(50));
        assert_eq!(a.admit("chat", 50, 0.0), Verdict::Admitted(50));
    }

    #[test]
    fn a_smaller_grant_takes_back_what_was_not_reserved_and_another_boot_s_grant_nothing() {
        let mut a = leased("boot b1\nchat 1000 256\n");
        assert_eq!(a.admit("chat", 400, 0.0), Verdict::Admitted(400));
        a.load("boot b1\nchat 500 256\n", 0.0);
        assert!(matches!(
            a.admit("chat", 101, 0.0),
            Verdict::Refused { left: 100, .. }
        ));
        assert_eq!(a.admit("chat", 100, 0.0), Verdict::Admitted(100));
        // Below what is reserved already: nothing more until it grows again.
        a.load("boot b1\nchat 300 256\n", 0.0);
        assert!(matches!(
            a.admit("chat", 0, 0.0),
            Verdict::Refused { left: 0, .. }
        ));
        assert!(matches!(
            a.admit("chat", 1, 0.0),
            Verdict::Refused { left: 0, .. }
        ));
        // A previous process's file: the route is leased, nothing granted beyond what was.
        let mut fresh = leased("boot b0\nchat 1000000 256\n");
        assert!(matches!(
            fresh.admit("chat", 1, 0.0),
            Verdict::Refused { .. }
        ));
        // Unlisted: no longer budgeted here; listed again: reservations start from zero.
        a.load("boot b1\n", 0.0);
        assert_eq!(a.admit("chat", 1 << 30, 0.0), Verdict::NotLeased);
        // Listed again: it counts from every reservation the log carries (400 + 100; a request
        // of a route not leased reserves nothing), as the sidecar settles them.
        a.load("boot b1\nchat 10 1\nbad line x\nchat2 x 1\n", 0.0);
        assert_eq!(a.reservations(), "boot b1\nchat 500 10 0\n");
    }
}
