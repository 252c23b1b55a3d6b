//! The global count behind budgets: every gateway replica's sidecar keeps cumulative counts per
//! route and backend ([`Report`], served at `GET /usage`); the operator leader reads them every
//! `--usage-interval` and adds what is new to the period totals of a namespace's [`Ledger`].
//!
//! The ledger holds, next to the totals, how much of each replica's cumulative counts it already
//! includes (its watermark). Both are stored together, in the operator's own namespace where
//! tenants have no access (ConfigMaps `llmroute-usage-<namespace>-<shard>`, a route and the
//! replicas' counts of it in the shard of its name, [`shard_of`], so no object nears 1 MiB), so
//! whichever operator replica leads next resumes exactly: it reads the ledger, reads the replicas'
//! counts, and adds the difference. Each shard is a ledger of its own. Nothing is counted twice (a
//! replica's counts are only ever added beyond its watermark) and nothing is lost while a replica
//! lives (its counts are cumulative). A replica restarted with a new sidecar process reports a new
//! `boot`: its counts start again from 0. Pure: no I/O, no clock of its own.

use std::collections::BTreeMap;

use k8s_openapi::jiff::civil::Date;
use k8s_openapi::jiff::tz::TimeZone;
use k8s_openapi::jiff::{Timestamp, ToSpan};
use serde::{Deserialize, Serialize};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::{BackendUsage, Budget, BudgetPeriod, LLMRoute, Remaining, UsageStatus};

/// Tokens and cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    pub tokens: u64,
    pub cost: f64,
}

impl Totals {
    fn add(&mut self, other: Totals) {
        self.tokens += other.tokens;
        self.cost += other.cost;
    }

    /// What `self` holds beyond `earlier` (counts only grow within one boot).
    fn beyond(self, earlier: Totals) -> Totals {
        Totals {
            tokens: self.tokens.saturating_sub(earlier.tokens),
            cost: (self.cost - earlier.cost).max(0.0),
        }
    }

    fn is_zero(&self) -> bool {
        self.tokens == 0 && self.cost == 0.0
    }
}

/// Counts per route, then per backend.
pub type Counts = BTreeMap<String, BTreeMap<String, Totals>>;

/// What a gateway replica's sidecar serves at `GET /usage`: its cumulative counts since it started.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Random id of the sidecar's process: another id means counts that started again at 0.
    pub boot: String,
    pub counts: Counts,
    /// How many answers the counts include: what the reader acknowledges (`POST /usage/ack`) once
    /// it stored them, so a draining sidecar knows its counts were handed over. A read alone
    /// changes nothing.
    #[serde(default)]
    pub seq: u64,
    /// How many of those answers the sidecar knows are stored (acknowledged): the reader
    /// acknowledges only when this is behind `seq`.
    #[serde(default)]
    pub acked: u64,
    /// What the replica's Envoy holds of leased budgets (admission), read after the counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leases: Option<super::lease::Holding>,
}

impl Report {
    /// The report in the parts the ledger's shards count: by shard, the counts of its routes.
    pub fn by_shard(&self) -> BTreeMap<u32, Report> {
        let mut parts: BTreeMap<u32, Report> = BTreeMap::new();
        for (route, counts) in &self.counts {
            let part = parts.entry(shard_of(route)).or_insert_with(|| Report {
                boot: self.boot.clone(),
                counts: Counts::new(),
                seq: self.seq,
                acked: self.acked,
                leases: None,
            });
            part.counts.insert(route.clone(), counts.clone());
        }
        parts
    }
}

/// Shards of a namespace's ledger. At 10,000 routes of 3 backends and 4 replicas a shard holds
/// about 380 KB (a unit test measures it), well under a ConfigMap's 1 MiB.
pub const SHARDS: u32 = 32;

/// The shard of a route's counts: FNV-1a of its name (stable across releases and processes).
pub fn shard_of(route: &str) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in route.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % u64::from(SHARDS)) as u32
}

/// A period's totals.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    /// The period ([`Period::key`]) the totals are of.
    pub period: String,
    #[serde(flatten)]
    pub totals: Totals,
}

impl Bucket {
    /// The totals of `period`: none when the bucket is of an earlier one.
    pub fn of(&self, period: &str) -> Totals {
        if self.period == period {
            self.totals
        } else {
            Totals::default()
        }
    }

    fn add(&mut self, period: &str, delta: Totals) {
        if self.period != period {
            *self = Bucket {
                period: period.to_string(),
                totals: Totals::default(),
            };
        }
        self.totals.add(delta);
    }
}

/// One route's totals: the whole route in its period, and each backend in its own.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RouteTotals {
    pub route: Bucket,
    #[serde(default)]
    pub backends: BTreeMap<String, Bucket>,
}

/// How much of one replica's counts the ledger includes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Watermark {
    pub boot: String,
    /// When the replica's counts were last read, in milliseconds since the Unix epoch.
    pub seen_ms: u64,
    pub counts: Counts,
}

/// The periods a route's counts go into: the route's and each backend's.
pub trait Periods {
    fn route(&self, route: &str) -> Period;
    fn backend(&self, route: &str, backend: &str) -> Period;
}

/// A namespace's usage: period totals per route, and the replicas' watermarks.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    #[serde(default)]
    pub routes: BTreeMap<String, RouteTotals>,
    /// By replica (node id: the gateway Pod's name).
    #[serde(default)]
    pub replicas: BTreeMap<String, Watermark>,
}

impl Ledger {
    /// Adds what `report` of replica `node` counts beyond the ledger's watermark, to the periods
    /// current at `now_ms`. Returns whether any total changed.
    pub fn apply(
        &mut self,
        node: &str,
        report: &Report,
        now_ms: u64,
        periods: &impl Periods,
    ) -> bool {
        let mark = self.replicas.entry(node.to_string()).or_default();
        if mark.boot != report.boot {
            // A new process (or a replica never read): everything it counted is new.
            mark.boot = report.boot.clone();
            mark.counts.clear();
        }
        mark.seen_ms = now_ms;
        let mut changed = false;
        for (route, backends) in &report.counts {
            for (backend, now) in backends {
                let before = mark
                    .counts
                    .get(route)
                    .and_then(|b| b.get(backend))
                    .copied()
                    .unwrap_or_default();
                let delta = now.beyond(before);
                mark.counts
                    .entry(route.clone())
                    .or_default()
                    .insert(backend.clone(), *now);
                if delta.is_zero() {
                    continue;
                }
                changed = true;
                let totals = self.routes.entry(route.clone()).or_default();
                totals.route.add(&periods.route(route).key(now_ms).0, delta);
                totals
                    .backends
                    .entry(backend.clone())
                    .or_default()
                    .add(&periods.backend(route, backend).key(now_ms).0, delta);
            }
        }
        changed
    }

    /// Forgets replicas not read for `max_age_ms` (Pods long gone) and routes not in `routes`.
    /// Returns whether anything was forgotten.
    pub fn prune<'a>(
        &mut self,
        now_ms: u64,
        max_age_ms: u64,
        routes: impl IntoIterator<Item = &'a str>,
    ) -> bool {
        let before = (self.replicas.len(), self.routes.len());
        self.replicas
            .retain(|_, m| now_ms.saturating_sub(m.seen_ms) < max_age_ms);
        let keep: std::collections::BTreeSet<&str> = routes.into_iter().collect();
        self.routes.retain(|r, _| keep.contains(r.as_str()));
        before != (self.replicas.len(), self.routes.len())
    }
}

/// A cost as status shows it: a decimal with at most 6 places.
pub fn format_cost(cost: f64) -> String {
    let text = format!("{:.6}", cost.max(0.0));
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text.is_empty() {
        "0".into()
    } else {
        text.into()
    }
}

fn remaining(budget: Option<&Budget>, used: Totals) -> Option<Remaining> {
    let budget = budget?;
    Some(Remaining {
        tokens: budget.tokens.map(|t| t.saturating_sub(used.tokens)),
        cost: budget
            .cost
            .as_deref()
            .and_then(|c| c.parse::<f64>().ok())
            .map(|c| format_cost(c - used.cost)),
    })
}

/// `status.usage` of `route` from its totals at `now_ms`: the route's period and each backend's
/// (those that answered this period or have a budget). Cost only when some backend has a price.
pub fn usage_status(route: &LLMRoute, totals: Option<&RouteTotals>, now_ms: u64) -> UsageStatus {
    let priced = route.spec.backends.iter().any(|b| b.cost.is_some());
    let cost = |t: Totals| priced.then(|| format_cost(t.cost));
    let budget = route.spec.policy.budget.as_ref();
    let period = Period::of(budget);
    let (key, resets_at) = period.key(now_ms);
    let used = totals.map(|t| t.route.of(&key)).unwrap_or_default();
    let backends = route
        .spec
        .backends
        .iter()
        .filter_map(|b| {
            let own = b.budget.as_ref().map(|x| Period::of(Some(x)));
            let (key, _) = own.as_ref().unwrap_or(&period).key(now_ms);
            let bucket = totals.and_then(|t| t.backends.get(&b.name));
            let used = bucket.map(|x| x.of(&key)).unwrap_or_default();
            (b.budget.is_some() || !used.is_zero()).then(|| BackendUsage {
                name: b.name.clone(),
                period: key,
                tokens: used.tokens,
                cost: cost(used),
                remaining: remaining(b.budget.as_ref(), used),
            })
        })
        .collect();
    UsageStatus {
        period: key,
        resets_at: Timestamp::from_millisecond(resets_at as i64).ok().map(Time),
        tokens: used.tokens,
        cost: cost(used),
        remaining: remaining(budget, used),
        backends,
    }
}

/// A budget's period: a calendar day or month in a time zone.
#[derive(Clone, Debug, PartialEq)]
pub struct Period {
    pub kind: BudgetPeriod,
    pub zone: TimeZone,
}

impl Default for Period {
    fn default() -> Self {
        Period {
            kind: BudgetPeriod::Month,
            zone: TimeZone::UTC,
        }
    }
}

impl Period {
    /// The period of `budget`: a calendar month in UTC without one. A zone the bundled time zone
    /// database does not know (the API server refuses those) counts in UTC.
    pub fn of(budget: Option<&Budget>) -> Period {
        let Some(b) = budget else {
            return Period::default();
        };
        let zone = b
            .time_zone
            .as_deref()
            .and_then(|z| TimeZone::get(z).ok())
            .unwrap_or(TimeZone::UTC);
        Period {
            kind: b.period,
            zone,
        }
    }

    /// The period `at_ms` falls in: its key (`2026-12` for a month, `2026-12-01` for a day, the
    /// date in the period's zone) and when it ends (the zone's next midnight or first of the
    /// month), in milliseconds since the Unix epoch.
    pub fn key(&self, at_ms: u64) -> (String, u64) {
        let date = Timestamp::from_millisecond(at_ms as i64)
            .unwrap_or(Timestamp::UNIX_EPOCH)
            .to_zoned(self.zone.clone())
            .date();
        let (key, next): (String, Option<Date>) = match self.kind {
            BudgetPeriod::Day => (
                format!("{:04}-{:02}-{:02}", date.year(), date.month(), date.day()),
                date.checked_add(1.day()).ok(),
            ),
            BudgetPeriod::Month => (
                format!("{:04}-{:02}", date.year(), date.month()),
                date.first_of_month().checked_add(1.month()).ok(),
            ),
        };
        let end = next
            .and_then(|d| d.to_zoned(self.zone.clone()).ok())
            .map(|z| z.timestamp().as_millisecond().max(0) as u64)
            .unwrap_or(u64::MAX);
        (key, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Monthly;
    impl Periods for Monthly {
        fn route(&self, _: &str) -> Period {
            Period::default()
        }
        fn backend(&self, _: &str, backend: &str) -> Period {
            if backend == "free" {
                utc(BudgetPeriod::Day)
            } else {
                Period::default()
            }
        }
    }

    fn utc(kind: BudgetPeriod) -> Period {
        Period {
            kind,
            zone: TimeZone::UTC,
        }
    }

    fn period_key(kind: BudgetPeriod, at_ms: u64) -> (String, u64) {
        utc(kind).key(at_ms)
    }

    /// 2026-12-01T10:00:00Z
    const DEC_1: u64 = 1_796_119_200_000;

    /// 10,000 routes of 3 backends read from 4 replicas: every shard's ledger, as stored, is well
    /// under a ConfigMap's 1 MiB, and the shards together count exactly what one ledger would.
    #[test]
    fn shards_of_ten_thousand_routes_stay_small_and_add_up() {
        let backends = ["zhipu-glm-4-plus", "qianfan-ernie-4", "deepseek-chat-v3"];
        let report = |boot: &str| Report {
            boot: boot.into(),
            seq: 1,
            acked: 0,
            leases: None,
            counts: (0..10_000)
                .map(|i| {
                    let b = backends.iter().map(|b| {
                        let t = Totals {
                            tokens: 1_234_567_890 + i,
                            cost: 12_345.678_901,
                        };
                        (b.to_string(), t)
                    });
                    (format!("team-chat-route-{i:05}"), b.collect())
                })
                .collect(),
        };
        let mut whole = Ledger::default();
        let mut shards: BTreeMap<u32, Ledger> = BTreeMap::new();
        for replica in 0..4 {
            let node = format!("llmroute-gateway-7d9f8c6b5-x{replica:04}");
            let r = report(&format!("boot-{replica}"));
            whole.apply(&node, &r, DEC_1, &Monthly);
            for (shard, part) in r.by_shard() {
                assert!(part.counts.keys().all(|route| shard_of(route) == shard));
                shards
                    .entry(shard)
                    .or_default()
                    .apply(&node, &part, DEC_1, &Monthly);
            }
        }
        assert_eq!(shards.len(), SHARDS as usize);
        let largest = shards
            .values()
            .map(|l| serde_json::to_string(l).unwrap().len())
            .max()
            .unwrap();
        println!("largest shard: {largest} bytes");
        assert!(largest < 512 * 1024, "{largest} bytes");
        let mut merged = BTreeMap::new();
        for l in shards.values() {
            merged.extend(l.routes.clone());
        }
        assert_eq!(merged, whole.routes);
    }
    const DAY: u64 = 86_400_000;

    fn report(boot: &str, counts: &[(&str, &str, u64, f64)]) -> Report {
        let mut r = Report {
            seq: 0,
            acked: 0,
            boot: boot.into(),
            counts: Counts::new(),
            leases: None,
        };
        for (route, backend, tokens, cost) in counts {
            r.counts.entry(route.to_string()).or_default().insert(
                backend.to_string(),
                Totals {
                    tokens: *tokens,
                    cost: *cost,
                },
            );
        }
        r
    }

    fn route_tokens(l: &Ledger, route: &str, at: u64) -> u64 {
        l.routes[route]
            .route
            .of(&period_key(BudgetPeriod::Month, at).0)
            .tokens
    }

    #[test]
    fn periods_are_utc_calendar_days_and_months() {
        assert_eq!(
            period_key(BudgetPeriod::Month, DEC_1),
            ("2026-12".to_string(), 1_798_761_600_000)
        );
        assert_eq!(
            period_key(BudgetPeriod::Day, DEC_1),
            ("2026-12-01".to_string(), 1_796_169_600_000)
        );
        // The last millisecond of a day is in it; the next is not.
        let end = period_key(BudgetPeriod::Day, DEC_1).1;
        assert_eq!(period_key(BudgetPeriod::Day, end - 1).0, "2026-12-01");
        assert_eq!(period_key(BudgetPeriod::Day, end).0, "2026-12-02");
    }

    /// 2026-12-07T15:59:59.999Z is 23:59:59.999 in Shanghai (UTC+8, no daylight saving): the last
    /// moment of the local day 2026-12-07; a millisecond later the day 2026-12-08 begins.
    #[test]
    fn periods_follow_the_calendar_of_their_time_zone() {
        let budget = |period: &str, zone: Option<&str>| {
            let mut v = serde_json::json!({ "period": period, "tokens": 10 });
            if let Some(z) = zone {
                v["timeZone"] = z.into();
            }
            serde_json::from_value::<Budget>(v).unwrap()
        };
        let shanghai = Period::of(Some(&budget("Day", Some("Asia/Shanghai"))));
        let local_midnight: u64 = 1_796_659_200_000; // 2026-12-07T16:00:00Z
        assert_eq!(
            shanghai.key(local_midnight - 1),
            ("2026-12-07".to_string(), local_midnight)
        );
        assert_eq!(shanghai.key(local_midnight).0, "2026-12-08");
        // In UTC the same instants are both 2026-12-07.
        let utc_day = Period::of(Some(&budget("Day", None)));
        assert_eq!(utc_day.key(local_midnight - 1).0, "2026-12-07");
        assert_eq!(utc_day.key(local_midnight).0, "2026-12-07");
        // A month in Shanghai starts at 16:00 UTC on the last day of the previous month.
        let month = Period::of(Some(&budget("Month", Some("Asia/Shanghai"))));
        let dec_1_local: u64 = 1_796_054_400_000; // 2026-11-30T16:00:00Z
        assert_eq!(month.key(dec_1_local - 1).0, "2026-11");
        assert_eq!(
            month.key(dec_1_local),
            ("2026-12".to_string(), 1_798_732_800_000)
        );
        // Daylight saving: a Berlin day in March 2026 that is 23 hours long still ends at midnight.
        let berlin = Period::of(Some(&budget("Day", Some("Europe/Berlin"))));
        let mar_29_local: u64 = 1_774_738_800_000; // 2026-03-28T23:00:00Z, 00:00 CET
        let (key, end) = berlin.key(mar_29_local);
        assert_eq!(key, "2026-03-29");
        assert_eq!(end - mar_29_local, 23 * 3_600_000);
    }

    #[test]
    fn two_replicas_add_up_and_nothing_is_counted_twice() {
        let mut l = Ledger::default();
        assert!(l.apply(
            "gw-a",
            &report("a1", &[("chat", "zhipu", 100, 0.5)]),
            DEC_1,
            &Monthly
        ));
        assert!(l.apply(
            "gw-b",
            &report("b1", &[("chat", "zhipu", 40, 0.25)]),
            DEC_1,
            &Monthly
        ));
        // The same counts read again add nothing.
        assert!(!l.apply(
            "gw-a",
            &report("a1", &[("chat", "zhipu", 100, 0.5)]),
            DEC_1 + 1,
            &Monthly
        ));
        assert!(l.apply(
            "gw-a",
            &report("a1", &[("chat", "zhipu", 130, 0.75)]),
            DEC_1 + 2,
            &Monthly
        ));
        assert_eq!(route_tokens(&l, "chat", DEC_1), 170);
        let cost = l.routes["chat"].backends["zhipu"].totals.cost;
        assert!((cost - 1.0).abs() < 1e-9, "{cost}");
    }

    #[test]
    fn a_restarted_sidecar_counts_from_zero_and_a_new_leader_resumes_from_the_stored_ledger() {
        let mut l = Ledger::default();
        l.apply(
            "gw-a",
            &report("a1", &[("chat", "zhipu", 100, 0.0)]),
            DEC_1,
            &Monthly,
        );
        // Stored, then read back by the next leader, which reads the replica again.
        let stored = serde_json::to_string(&l).unwrap();
        let mut next: Ledger = serde_json::from_str(&stored).unwrap();
        assert_eq!(next, l);
        next.apply(
            "gw-a",
            &report("a1", &[("chat", "zhipu", 150, 0.0)]),
            DEC_1 + 5,
            &Monthly,
        );
        assert_eq!(route_tokens(&next, "chat", DEC_1), 150);
        // The sidecar restarted: its 20 tokens are all new.
        next.apply(
            "gw-a",
            &report("a2", &[("chat", "zhipu", 20, 0.0)]),
            DEC_1 + 9,
            &Monthly,
        );
        assert_eq!(route_tokens(&next, "chat", DEC_1), 170);
    }

    #[test]
    fn each_bucket_starts_again_in_its_own_next_period() {
        let mut l = Ledger::default();
        l.apply(
            "gw-a",
            &report("a", &[("chat", "free", 10, 0.0)]),
            DEC_1,
            &Monthly,
        );
        l.apply(
            "gw-a",
            &report("a", &[("chat", "free", 25, 0.0)]),
            DEC_1 + DAY,
            &Monthly,
        );
        let free = &l.routes["chat"].backends["free"];
        assert_eq!(free.period, "2026-12-02");
        assert_eq!(free.of("2026-12-02").tokens, 15);
        assert_eq!(free.of("2026-12-01").tokens, 0);
        // The route's month goes on.
        assert_eq!(route_tokens(&l, "chat", DEC_1 + DAY), 25);
    }

    #[test]
    fn replicas_long_gone_and_deleted_routes_are_forgotten() {
        let mut l = Ledger::default();
        l.apply(
            "gw-a",
            &report("a", &[("chat", "x", 1, 0.0), ("old", "x", 1, 0.0)]),
            DEC_1,
            &Monthly,
        );
        l.apply("gw-b", &report("b", &[]), DEC_1 + DAY, &Monthly);
        assert!(l.prune(DEC_1 + DAY + 1, DAY, ["chat"]));
        assert_eq!(l.replicas.keys().collect::<Vec<_>>(), ["gw-b"]);
        assert_eq!(l.routes.keys().collect::<Vec<_>>(), ["chat"]);
        assert!(!l.prune(DEC_1 + DAY + 1, DAY, ["chat"]));
    }
}
