//! Balancing algorithms: which server of a pool serves the next connection.
//!
//! The algorithms see the pool through [`Candidates`], a read-only view that says how many
//! servers there are, which of them may be chosen right now, and each one's weight, active
//! connections and hash key. The pool decides eligibility (health, ejection, servers already
//! tried); the algorithms only choose among the eligible. No pick allocates: state lives in the
//! [`Balancer`] (a small `Mutex<Vec<i64>>` for smooth weighted round robin; the others keep none), and every algorithm is a scan over at most the pool's length.

use crate::config::Balance;
use rand::Rng;
use std::net::IpAddr;
use std::sync::Mutex;

/// A read-only view of a pool's servers, as the balancing algorithms need it.
pub trait Candidates {
    /// Number of servers (eligible or not); indices run `0..len()`.
    fn len(&self) -> usize;
    /// Whether the pool has no servers at all.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether server `i` may be chosen now.
    fn eligible(&self, i: usize) -> bool;
    /// Relative weight of server `i`, at least 1.
    fn weight(&self, i: usize) -> u32;
    /// Connections using server `i` now.
    fn active(&self, i: usize) -> usize;
    /// A stable hash of server `i`'s identity (its address), for consistent hashing.
    fn key(&self, i: usize) -> u64;
}

/// A balancing algorithm with whatever state it keeps between picks.
#[derive(Debug)]
pub enum Balancer {
    /// Smooth weighted round robin; `current[i]` is nginx's `current_weight` of server `i`.
    RoundRobin {
        /// Current weights, one per server.
        current: Mutex<Vec<i64>>,
    },
    /// Weighted least connections, ties broken at random by weight.
    LeastConn,
    /// Power of two random choices, candidates sampled by weight.
    RandomTwo,
    /// Weighted rendezvous (highest random weight) hashing of the client IP.
    HashClient,
}

impl Balancer {
    /// A balancer of kind `kind` for a pool of `n` servers.
    pub fn new(kind: Balance, n: usize) -> Balancer {
        match kind {
            Balance::RoundRobin => Balancer::RoundRobin {
                current: Mutex::new(vec![0; n]),
            },
            Balance::LeastConn => Balancer::LeastConn,
            Balance::RandomTwo => Balancer::RandomTwo,
            Balance::HashClient => Balancer::HashClient,
        }
    }

    /// Chooses an eligible server for `client`; `None` when no server is eligible.
    pub fn pick(&self, c: &impl Candidates, client: IpAddr) -> Option<usize> {
        match self {
            Balancer::RoundRobin { current } => {
                // A poisoned lock only means another pick panicked mid-update; the weights
                // are still plain integers, so carry on with them.
                let mut cur = current.lock().unwrap_or_else(|p| p.into_inner());
                smooth_wrr(&mut cur, c)
            }
            Balancer::LeastConn => least_conn(c, &mut rand::rng()),
            Balancer::RandomTwo => random_two(c, &mut rand::rng()),
            Balancer::HashClient => rendezvous(c, hash_ip(client)),
        }
    }
}

/// nginx's smooth weighted round robin: every eligible server's current weight grows by its
/// weight, the largest wins (first on ties) and pays back the total. Ineligible servers keep
/// their current weight, as in nginx.
pub fn smooth_wrr(current: &mut [i64], c: &impl Candidates) -> Option<usize> {
    let mut total: i64 = 0;
    let mut best: Option<(usize, i64)> = None;
    for (i, cur) in current.iter_mut().enumerate().take(c.len()) {
        if !c.eligible(i) {
            continue;
        }
        let w = i64::from(c.weight(i));
        *cur += w;
        total += w;
        if best.is_none_or(|(_, b)| *cur > b) {
            best = Some((i, *cur));
        }
    }
    let (b, _) = best?;
    current[b] -= total;
    Some(b)
}

/// Weighted least connections: the eligible server with the smallest `active / weight`,
/// compared by cross-multiplication (no floats). Ties are broken at random in proportion to
/// weight (a one-pass weighted reservoir), so at equal load, and in particular when connections
/// are short and the load is always zero, servers are chosen by weight as nginx does.
pub fn least_conn(c: &impl Candidates, rng: &mut impl Rng) -> Option<usize> {
    // (index, active, weight, total weight of the servers tied with it so far)
    let mut best: Option<(usize, u64, u64, u64)> = None;
    for i in 0..c.len() {
        if !c.eligible(i) {
            continue;
        }
        let (a, w) = (c.active(i) as u64, u64::from(c.weight(i)));
        best = match best {
            None => Some((i, a, w, w)),
            Some((bi, ba, bw, tied)) => {
                let (lhs, rhs) = (a * bw, ba * w);
                if lhs < rhs {
                    Some((i, a, w, w))
                } else if lhs == rhs {
                    // Replace the current choice with probability w / (tied + w).
                    let tied = tied + w;
                    if rng.random_range(0..tied) < w {
                        Some((i, a, w, tied))
                    } else {
                        Some((bi, ba, bw, tied))
                    }
                } else {
                    best
                }
            }
        };
    }
    best.map(|(i, ..)| i)
}

/// Power of two choices: two distinct eligible servers sampled with probability proportional
/// to weight; the one with the smaller `active / weight` wins, the first sampled on ties (so at
/// zero load the distribution follows the weights).
pub fn random_two(c: &impl Candidates, rng: &mut impl Rng) -> Option<usize> {
    let total: u64 = (0..c.len())
        .filter(|&i| c.eligible(i))
        .map(|i| u64::from(c.weight(i)))
        .sum();
    let first = weighted_sample(c, rng, total, None)?;
    let rest = total - u64::from(c.weight(first));
    let Some(second) = weighted_sample(c, rng, rest, Some(first)) else {
        return Some(first);
    };
    let (a1, w1) = (c.active(first) as u64, u64::from(c.weight(first)));
    let (a2, w2) = (c.active(second) as u64, u64::from(c.weight(second)));
    Some(if a2 * w1 < a1 * w2 { second } else { first })
}

/// One eligible server (other than `skip`) sampled by weight; `total` is the sum of the
/// weights it samples from.
fn weighted_sample(
    c: &impl Candidates,
    rng: &mut impl Rng,
    total: u64,
    skip: Option<usize>,
) -> Option<usize> {
    if total == 0 {
        return None;
    }
    let mut r = rng.random_range(0..total);
    for i in 0..c.len() {
        if !c.eligible(i) || Some(i) == skip {
            continue;
        }
        let w = u64::from(c.weight(i));
        if r < w {
            return Some(i);
        }
        r -= w;
    }
    None
}

/// Weighted rendezvous hashing: each eligible server scores `weight / -ln(u)` where `u` in
/// (0, 1) is a hash of (client, server); the highest score wins. A client's winner changes only
/// when that winner leaves or a new server outscores it, so removing or ejecting a server moves
/// only its own clients, and each server wins a share proportional to its weight.
pub fn rendezvous(c: &impl Candidates, client: u64) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for i in 0..c.len() {
        if !c.eligible(i) {
            continue;
        }
        let h = mix(client ^ mix(c.key(i)));
        // 53 random bits, offset by half a step so u is never 0 or 1.
        let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let score = f64::from(c.weight(i)) / -u.ln();
        if best.is_none_or(|(_, s)| score > s) {
            best = Some((i, score));
        }
    }
    best.map(|(i, _)| i)
}

/// The 64-bit finaliser of SplitMix64: a fixed, well-mixing function, so hashes (and therefore
/// which server a client lands on) are the same in every process and every generation.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Stable hash of bytes: each 8-byte chunk folded through [`mix`].
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h = mix(bytes.len() as u64);
    for chunk in bytes.chunks(8) {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        h = mix(h ^ u64::from_le_bytes(b));
    }
    h
}

/// Stable hash of a client address.
pub fn hash_ip(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => hash_bytes(&v4.octets()),
        IpAddr::V6(v6) => hash_bytes(&v6.octets()),
    }
}

/// Stable hash of a server address (its identity in the rendezvous).
pub fn hash_addr(addr: std::net::SocketAddr) -> u64 {
    mix(hash_ip(addr.ip()) ^ u64::from(addr.port()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use std::net::{Ipv4Addr, SocketAddr};

    /// A pool as plain data.
    struct Pool {
        weight: Vec<u32>,
        active: Vec<usize>,
        up: Vec<bool>,
        key: Vec<u64>,
    }

    impl Pool {
        fn new(weight: &[u32]) -> Pool {
            let n = weight.len();
            Pool {
                weight: weight.to_vec(),
                active: vec![0; n],
                up: vec![true; n],
                key: (0..n)
                    .map(|i| hash_addr(SocketAddr::from(([10, 0, 0, i as u8 + 1], 8080))))
                    .collect(),
            }
        }
    }

    impl Candidates for Pool {
        fn len(&self) -> usize {
            self.weight.len()
        }
        fn eligible(&self, i: usize) -> bool {
            self.up[i]
        }
        fn weight(&self, i: usize) -> u32 {
            self.weight[i]
        }
        fn active(&self, i: usize) -> usize {
            self.active[i]
        }
        fn key(&self, i: usize) -> u64 {
            self.key[i]
        }
    }

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
    }

    #[test]
    fn smooth_wrr_gives_nginx_sequence() {
        let p = Pool::new(&[5, 1, 1]);
        let b = Balancer::new(Balance::RoundRobin, 3);
        let seq: String = (0..21)
            .map(|_| (b'a' + b.pick(&p, ip(1)).unwrap() as u8) as char)
            .collect();
        assert_eq!(seq, "aabacaa".repeat(3));
    }

    #[test]
    fn smooth_wrr_skips_ineligible_servers() {
        let mut p = Pool::new(&[5, 1, 1]);
        p.up[0] = false;
        let b = Balancer::new(Balance::RoundRobin, 3);
        let seq: String = (0..6)
            .map(|_| (b'a' + b.pick(&p, ip(1)).unwrap() as u8) as char)
            .collect();
        assert_eq!(seq, "bcbcbc");
        p.up = vec![false; 3];
        assert_eq!(b.pick(&p, ip(1)), None);
    }

    #[test]
    fn weighted_distribution_is_proportional() {
        let weights = [1u32, 2, 3, 4];
        let picks = 10_000;
        for kind in [Balance::RoundRobin, Balance::LeastConn, Balance::RandomTwo] {
            let p = Pool::new(&weights);
            let b = Balancer::new(kind, weights.len());
            let mut count = [0usize; 4];
            for _ in 0..picks {
                count[b.pick(&p, ip(1)).unwrap()] += 1;
            }
            for (i, w) in weights.iter().enumerate() {
                let expected = picks * *w as usize / 10;
                let diff = count[i].abs_diff(expected);
                // Round robin is exact; random sampling stays well within 10%.
                assert!(
                    diff * 10 <= expected,
                    "{kind:?}: server {i} got {} of {picks}, expected ~{expected}",
                    count[i]
                );
            }
            if kind == Balance::RoundRobin {
                assert_eq!(count, [1000, 2000, 3000, 4000]);
            }
        }
        // Hashing spreads distinct clients by weight.
        let p = Pool::new(&weights);
        let mut count = [0usize; 4];
        for n in 0..picks as u32 {
            count[rendezvous(&p, hash_ip(ip(n))).unwrap()] += 1;
        }
        for (i, w) in weights.iter().enumerate() {
            let expected = picks * *w as usize / 10;
            assert!(
                count[i].abs_diff(expected) * 10 <= expected,
                "hash: server {i} got {}, expected ~{expected}",
                count[i]
            );
        }
    }

    #[test]
    fn least_conn_picks_minimum_active_per_weight() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut p = Pool::new(&[1, 4, 2]);
        p.active = vec![2, 4, 3];
        // Ratios 2, 1, 1.5: always server 1.
        for _ in 0..100 {
            assert_eq!(least_conn(&p, &mut rng), Some(1));
        }
        p.active = vec![0, 9, 1];
        assert_eq!(least_conn(&p, &mut rng), Some(0));
        p.up[0] = false;
        // Ratios 2.25 and 0.5.
        assert_eq!(least_conn(&p, &mut rng), Some(2));
        p.up = vec![false; 3];
        assert_eq!(least_conn(&p, &mut rng), None);
    }

    #[test]
    fn least_conn_breaks_ties_by_weight() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut p = Pool::new(&[1, 3, 1]);
        // Servers 0 and 1 tie at ratio 1 (1/1, 3/3); server 2 is worse (2/1).
        p.active = vec![1, 3, 2];
        let mut count = [0usize; 3];
        for _ in 0..8000 {
            count[least_conn(&p, &mut rng).unwrap()] += 1;
        }
        assert_eq!(count[2], 0, "{count:?}");
        assert!(count[0] > 1500 && count[0] < 2500, "{count:?}");
        assert!(count[1] > 5500 && count[1] < 6500, "{count:?}");
    }

    #[test]
    fn random_two_prefers_the_less_loaded() {
        let mut p = Pool::new(&[1, 1]);
        p.active = vec![10, 1];
        let mut rng = StdRng::seed_from_u64(7);
        // With two servers both are always sampled: the less loaded always wins.
        for _ in 0..1000 {
            assert_eq!(random_two(&p, &mut rng), Some(1));
        }
        // Five servers, one idle: it wins whenever sampled (probability 2/5), and the most
        // loaded server can never win (it loses to anything it is paired with).
        let mut p = Pool::new(&[1, 1, 1, 1, 1]);
        p.active = vec![5, 5, 0, 5, 9];
        let mut count = [0usize; 5];
        for _ in 0..10_000 {
            count[random_two(&p, &mut rng).unwrap()] += 1;
        }
        assert_eq!(count[4], 0, "{count:?}");
        assert!(count[2] > 3_500 && count[2] < 4_500, "{count:?}");
        // A single eligible server is chosen alone.
        p.up = vec![false, false, false, true, false];
        assert_eq!(random_two(&p, &mut rng), Some(3));
        p.up = vec![false; 5];
        assert_eq!(random_two(&p, &mut rng), None);
    }

    #[test]
    fn hash_client_is_sticky() {
        let p = Pool::new(&[1, 2, 1, 1]);
        let b = Balancer::new(Balance::HashClient, 4);
        for n in 0..1000 {
            let first = b.pick(&p, ip(n));
            assert!(first.is_some());
            for _ in 0..3 {
                assert_eq!(b.pick(&p, ip(n)), first);
            }
        }
    }

    #[test]
    fn hash_client_moves_only_the_removed_servers_clients() {
        let mut p = Pool::new(&[1, 2, 1, 1, 3]);
        let before: Vec<usize> = (0..1000)
            .map(|n| rendezvous(&p, hash_ip(ip(n))).unwrap())
            .collect();
        // Every server has clients, so the check below is not vacuous.
        for s in 0..5 {
            assert!(before.contains(&s));
        }
        for gone in 0..5 {
            p.up = vec![true; 5];
            p.up[gone] = false;
            let mut moved = 0;
            for (n, &was) in before.iter().enumerate() {
                let now = rendezvous(&p, hash_ip(ip(n as u32))).unwrap();
                if was == gone {
                    assert_ne!(now, gone);
                    moved += 1;
                } else {
                    assert_eq!(
                        now, was,
                        "client {n} moved from {was} to {now} when {gone} left"
                    );
                }
            }
            assert!(moved > 0);
        }
    }

    #[test]
    fn hashes_are_stable_across_processes() {
        // Fixed values: a successor must send a client where its predecessor did.
        assert_eq!(mix(0), 0xe220_a839_7b1d_cdaf);
        assert_eq!(hash_ip(ip(1)), hash_ip(ip(1)));
        assert_ne!(hash_ip(ip(1)), hash_ip(ip(2)));
    }
}
