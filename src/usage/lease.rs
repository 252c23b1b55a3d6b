//! Leases of a route's token budget to its gateway replicas: what each replica reports of its
//! admission ([`Holding`]), what the leader grants it ([`Lease`]), and how a grant is computed
//! ([`grants`]). The reasoning and the bound are in docs/design/usage.md ("Admission control").
//!
//! Units are each Envoy process's own, cumulative since it started: `reserved` (estimates it
//! admitted), `refused` (estimates it turned away), `granted` (what it may reserve in all), and
//! `settled` (reservations of its answers the sidecar counted).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One route's admission in one Envoy process, as its sidecar reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub reserved: u64,
    #[serde(default)]
    pub refused: u64,
    /// The largest grant the process may be obeying: the one it loaded or the last one written
    /// for it, whichever is larger.
    pub granted: u64,
    pub settled: u64,
}

/// A replica's admission: its Envoy process (boot id), its leased routes' budgets and rates.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holding {
    pub boot: String,
    pub routes: BTreeMap<String, Held>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rates: BTreeMap<String, RateHeld>,
}

/// What one Envoy process admitted and refused under a route's rate shares, cumulative.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateHeld {
    pub requests: u64,
    pub requests_refused: u64,
    pub tokens: u64,
    pub tokens_refused: u64,
}

/// What the leader grants one replica (`POST /usage/lease`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The Envoy process the grants are for (another one ignores them).
    pub boot: String,
    /// Seconds a refused client is told to wait.
    pub retry_after: u64,
    pub routes: BTreeMap<String, Grant>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rates: BTreeMap<String, RateGrant>,
}

/// One route's rate shares (0: no limit of that kind).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateGrant {
    pub requests_per_minute: u64,
    pub tokens_per_minute: u64,
    /// Completion tokens written into a request that sets no limit.
    pub cap: u64,
}

/// Shares of a per-minute `limit` among replicas by their demand since the last lease
/// (`w_i = demand_i + 1`): `⌊limit · w_i / Σ w⌋`, so that they never add up to more than the limit.
/// (While a lease travels a replica may still use its previous share: for that interval the sum
/// may be the old and new shares' larger; the bucket carries over what it held.)
pub fn shares(limit: u64, demands: &[u64]) -> Vec<u64> {
    let weights: Vec<u128> = demands.iter().map(|d| u128::from(*d) + 1).collect();
    let total: u128 = weights.iter().sum::<u128>().max(1);
    weights
        .iter()
        .map(|w| u64::try_from(u128::from(limit) * w / total).unwrap_or(u64::MAX))
        .collect()
}

/// One route's grant.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// What the process may reserve in all, in its own units.
    pub granted: u64,
    /// Completion tokens written into a request that sets no limit.
    pub cap: u64,
    /// When the budget's period ends (RFC 3339), for the refusal's message.
    #[serde(default)]
    pub resets_at: String,
}

/// One replica's part in a route's grants: what it reported and how much it asked for since the
/// last grant (reserved plus refused), which weighs its share.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Replica {
    pub held: Held,
    pub demand: u64,
}

/// The grants of one route's budget (`budget` tokens this period, `counted` of them used as the
/// ledger has them) to its replicas, in their order. With `in_flight_i = reserved_i − settled_i`
/// and `unused_i = granted_i − reserved_i` (what replica `i` may still reserve under the grant it
/// may be obeying):
///
/// - `available = budget − counted − Σ in_flight` (none when negative) is what all replicas may
///   still reserve; the leases keep `Σ unused ≤ available` (admitting moves a reservation from
///   `unused` to `in_flight`, counting an answer moves it from `in_flight` to `counted` at no more
///   than its reservation);
/// - each replica's target is its share of `available` by weight, `w_i = demand_i + 1`;
/// - a replica whose target is below its `unused` is lowered to the target, and counted at its
///   `unused` until it reports that it loaded the lower grant (it may be reserving meanwhile);
/// - the others share what is then left, each keeping at least its `unused`.
///
/// So whatever grant each replica obeys while leases travel, what they may still reserve stays
/// within `available`. A grant is returned in the replica's own units: `reserved_i + ` its new
/// `unused`.
pub fn grants(budget: u64, counted: u64, replicas: &[Replica]) -> Vec<u64> {
    let in_flight: u128 = replicas
        .iter()
        .map(|r| u128::from(r.held.reserved.saturating_sub(r.held.settled)))
        .sum();
    let available = u128::from(budget)
        .saturating_sub(u128::from(counted))
        .saturating_sub(in_flight);
    let unused: Vec<u128> = replicas
        .iter()
        .map(|r| u128::from(r.held.granted.saturating_sub(r.held.reserved)))
        .collect();
    let weights: Vec<u128> = replicas.iter().map(|r| u128::from(r.demand) + 1).collect();
    let total: u128 = weights.iter().sum::<u128>().max(1);
    let targets: Vec<u128> = weights.iter().map(|w| available * w / total).collect();
    let lowered: Vec<bool> = targets.iter().zip(&unused).map(|(t, u)| t < u).collect();
    let held_by_lowered: u128 = unused
        .iter()
        .zip(&lowered)
        .filter(|(_, l)| **l)
        .map(|(u, _)| *u)
        .sum();
    let growing_unused: u128 = unused
        .iter()
        .zip(&lowered)
        .filter(|(_, l)| !**l)
        .map(|(u, _)| *u)
        .sum();
    let growing_weight: u128 = weights
        .iter()
        .zip(&lowered)
        .filter(|(_, l)| !**l)
        .map(|(w, _)| *w)
        .sum::<u128>()
        .max(1);
    let pool = available
        .saturating_sub(held_by_lowered)
        .saturating_sub(growing_unused);
    replicas
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let new_unused = if lowered[i] {
                targets[i]
            } else {
                unused[i] + pool * weights[i] / growing_weight
            };
            let new_unused = u64::try_from(new_unused).unwrap_or(u64::MAX);
            r.held.reserved.saturating_add(new_unused)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(reserved: u64, granted: u64, settled: u64, demand: u64) -> Replica {
        Replica {
            held: Held {
                reserved,
                refused: 0,
                granted,
                settled,
            },
            demand,
        }
    }

    /// What the replicas may still reserve under whichever grant they obey (the one they hold or
    /// the new one), with what is in flight and what is counted, never passes the budget (when it
    /// did not before).
    fn holds(budget: u64, counted: u64, replicas: &[Replica]) -> Vec<u64> {
        let new = grants(budget, counted, replicas);
        let worst: u64 = replicas
            .iter()
            .zip(&new)
            .map(|(r, g)| r.held.granted.max(*g).max(r.held.reserved) - r.held.settled)
            .sum();
        assert!(counted + worst <= budget, "{replicas:?} -> {new:?}");
        new
    }

    #[test]
    fn rate_shares_follow_demand_and_never_add_up_past_the_limit() {
        assert_eq!(shares(60, &[0, 0]), vec![30, 30]);
        assert_eq!(shares(60, &[99, 0]), vec![59, 0]);
        assert_eq!(shares(7, &[0, 0, 0]), vec![2, 2, 2]);
        // Huge limits and demands do not overflow: the busy replica gets nearly all.
        let huge = shares(u64::MAX, &[u64::MAX, 3]);
        assert!(huge[0] > u64::MAX / 2 && huge[1] < 16, "{huge:?}");
        assert!(shares(5, &[]).is_empty());
    }

    #[test]
    fn a_fresh_budget_is_shared_by_demand() {
        assert_eq!(holds(1000, 0, &[replica(0, 0, 0, 0); 2]), vec![500, 500]);
        // One busy, one idle: the busy one gets nearly all of what is left.
        let g = holds(
            10_000,
            2_000,
            &[replica(3_000, 3_000, 2_000, 998), replica(0, 0, 0, 0)],
        );
        // In flight 1000 → available 7000; weights 999 : 1.
        assert_eq!(g, vec![3_000 + 6_993, 7]);
    }

    #[test]
    fn one_replica_gets_all_that_is_left_and_no_less_after_a_new_period() {
        // 478 reserved and counted as 203: 397 left, all of it this replica's.
        assert_eq!(
            holds(600, 203, &[replica(478, 753, 478, 0)]),
            vec![478 + 397]
        );
        // The period ends: counted 0, the whole budget again.
        assert_eq!(holds(600, 0, &[replica(478, 875, 478, 0)]), vec![478 + 600]);
        // Requests in flight are not granted again.
        assert_eq!(holds(600, 0, &[replica(478, 600, 200, 0)]), vec![478 + 322]);
    }

    #[test]
    fn an_idle_replica_s_grant_is_taken_back_once_it_loaded_the_smaller_one() {
        // Both got 500; replica 0 spent it all (counted), replica 1 nothing.
        let round = [replica(500, 500, 500, 500), replica(0, 500, 0, 0)];
        let g = holds(1000, 500, &round);
        // Available 500, targets 499 : 0 → replica 1 lowered to 0 but counted at 500 until it
        // says so: nothing for replica 0 yet.
        assert_eq!(g, vec![500, 0]);
        // It loaded 0: its 500 goes to the replica that asks.
        let g = holds(
            1000,
            500,
            &[replica(500, 500, 500, 300), replica(0, 0, 0, 0)],
        );
        assert_eq!(g, vec![500 + 500 * 301 / 302, 500 / 302]);
    }

    #[test]
    fn a_lowered_budget_only_lowers_grants_and_overflows_saturate() {
        // The budget was lowered under what is held: nobody gets more.
        let g = grants(100, 150, &[replica(10, 20, 5, 3)]);
        assert_eq!(g, vec![10]);
        assert_eq!(
            grants(u64::MAX, 0, &[replica(u64::MAX - 1, 0, 0, 0)]),
            vec![u64::MAX]
        );
        assert!(grants(0, 0, &[]).is_empty());
    }

    #[test]
    fn any_sequence_of_admissions_answers_and_leases_stays_within_the_budget() {
        // A small simulation: 3 replicas, requests of random size admitted against their grants,
        // answered below their reservation, counted, and leases recomputed in between.
        let mut seed = 7u64;
        let mut rnd = |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let budget = 50_000;
        let mut counted = 0;
        let mut rs = [Held::default(); 3];
        let mut open: Vec<(usize, u64)> = Vec::new();
        for _ in 0..2000 {
            match rnd(3) {
                0 => {
                    let i = rnd(3) as usize;
                    let r = 100 + rnd(900);
                    if rs[i].reserved + r <= rs[i].granted {
                        rs[i].reserved += r;
                        open.push((i, r));
                    }
                }
                1 if !open.is_empty() => {
                    let (i, r) = open.swap_remove(rnd(open.len() as u64) as usize);
                    counted += rnd(r + 1);
                    rs[i].settled += r;
                }
                _ => {
                    let parts: Vec<Replica> = rs
                        .iter()
                        .map(|h| Replica {
                            held: *h,
                            demand: rnd(1000),
                        })
                        .collect();
                    for (h, g) in rs.iter_mut().zip(holds(budget, counted, &parts)) {
                        h.granted = g;
                    }
                }
            }
            let worst: u64 = rs
                .iter()
                .map(|h| h.granted.max(h.reserved) - h.settled)
                .sum();
            assert!(counted + worst <= budget);
        }
        assert!(counted > budget / 2, "the budget was used: {counted}");
    }
}
