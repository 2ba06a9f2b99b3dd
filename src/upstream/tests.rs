//! Pool-level unit tests: eligibility, passive ejection and fail-open, on real pools.
#![allow(clippy::unwrap_used)]

use super::*;
use std::time::{Duration, Instant};

fn pool(
    balance: config::Balance,
    servers: &[(u16, u32)],
    eject_after: u32,
    eject_for: Duration,
) -> Arc<Upstream> {
    Upstream::new(&config::Upstream {
        name: "u".into(),
        servers: servers
            .iter()
            .map(|&(port, weight)| config::Server {
                addr: SocketAddr::from(([127, 0, 0, 1], port)).into(),
                weight,
            })
            .collect(),
        balance,
        connect_timeout: Duration::from_secs(1),
        retries: 2,
        health_check: None,
        resolve: None,
        eject_after,
        eject_for,
        http: config::UpstreamHttp::default(),
        tls: None,
    })
}

fn a(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

#[test]
fn guard_counts_active() {
    let u = pool(
        config::Balance::LeastConn,
        &[(1, 1), (2, 1)],
        3,
        Duration::from_secs(10),
    );
    let g1 = u.pick(CLIENT, &[]).unwrap();
    let g2 = u.pick(CLIENT, &[]).unwrap();
    assert_ne!(g1.addr(), g2.addr());
    assert_eq!(u.status().iter().map(|s| s.active).sum::<usize>(), 2);
    drop(g1);
    let g3 = u.pick(CLIENT, &[]).unwrap();
    assert_ne!(g3.addr(), g2.addr());
    drop((g2, g3));
    assert!(u.status().iter().all(|s| s.active == 0));
}

#[test]
fn exclude_is_respected_and_exhausts() {
    let u = pool(
        config::Balance::RoundRobin,
        &[(1, 1), (2, 1), (3, 1)],
        3,
        Duration::from_secs(10),
    );
    let g = u.pick(CLIENT, &[a(1), a(2)]).unwrap();
    assert_eq!(g.addr(), a(3));
    assert!(u.pick(CLIENT, &[a(1), a(2), a(3)]).is_none());
}

#[test]
fn unhealthy_servers_are_skipped() {
    let u = pool(
        config::Balance::RoundRobin,
        &[(1, 1), (2, 1), (3, 1)],
        3,
        Duration::from_secs(10),
    );
    u.set_healthy(a(2), false);
    for _ in 0..10 {
        assert_ne!(u.pick(CLIENT, &[]).unwrap().addr(), a(2));
    }
    // Healthy servers all tried: no fall back to the unhealthy one.
    assert!(u.pick(CLIENT, &[a(1), a(3)]).is_none());
    assert!(!u.status()[1].healthy);
}

#[test]
fn ejection_after_consecutive_failures_and_reset_on_success() {
    let u = pool(
        config::Balance::RoundRobin,
        &[(1, 1), (2, 1)],
        3,
        Duration::from_secs(60),
    );
    u.report(a(1), false);
    u.report(a(1), false);
    u.report(a(1), true);
    u.report(a(1), false);
    u.report(a(1), false);
    assert!(!u.status()[0].ejected, "a success resets the count");
    u.report(a(1), false);
    assert!(u.status()[0].ejected);
    assert_eq!(u.counters.ejections.load(Ordering::Relaxed), 1);
    for _ in 0..10 {
        assert_eq!(u.pick(CLIENT, &[]).unwrap().addr(), a(2));
    }
}

#[test]
fn eject_after_zero_disables_ejection() {
    let u = pool(
        config::Balance::RoundRobin,
        &[(1, 1), (2, 1)],
        0,
        Duration::from_secs(60),
    );
    for _ in 0..100 {
        u.report(a(1), false);
    }
    assert!(!u.status()[0].ejected);
}

#[test]
fn ejected_server_returns_after_eject_for_on_probation() {
    let u = pool(
        config::Balance::RoundRobin,
        &[(1, 1), (2, 1)],
        2,
        Duration::from_millis(50),
    );
    u.report(a(1), false);
    u.report(a(1), false);
    assert!(u.status()[0].ejected);
    // Wait for the (real, short) ejection to end; bounded generously.
    let deadline = Instant::now() + Duration::from_secs(20);
    while u.status()[0].ejected {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    let picked: Vec<_> = (0..4)
        .map(|_| u.pick(CLIENT, &[]).unwrap().addr())
        .collect();
    assert!(picked.contains(&a(1)), "{picked:?}");
    assert_eq!(u.counters.returns.load(Ordering::Relaxed), 1);
    // Probation: one more failure ejects it again.
    u.report(a(1), false);
    assert!(u.status()[0].ejected);
    assert_eq!(u.counters.ejections.load(Ordering::Relaxed), 2);
}

#[test]
fn fails_open_when_every_server_is_down() {
    let u = pool(
        config::Balance::RoundRobin,
        &[(1, 1), (2, 1), (3, 1)],
        1,
        Duration::from_secs(60),
    );
    u.set_healthy(a(1), false);
    u.set_healthy(a(2), false);
    u.report(a(3), false);
    assert!(u.status()[2].ejected);
    let mut seen: Vec<_> = (0..6)
        .map(|_| u.pick(CLIENT, &[]).unwrap().addr())
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen, vec![a(1), a(2), a(3)]);
    assert_eq!(u.counters.fail_open_picks.load(Ordering::Relaxed), 6);
    // Fail-open still honours exclude, and ends when all have been tried.
    assert_eq!(u.pick(CLIENT, &[a(1), a(3)]).unwrap().addr(), a(2));
    assert!(u.pick(CLIENT, &[a(1), a(2), a(3)]).is_none());
}

#[test]
fn hash_client_fail_open_keeps_clients_sticky() {
    let u = pool(
        config::Balance::HashClient,
        &[(1, 1), (2, 1), (3, 1)],
        3,
        Duration::from_secs(60),
    );
    let before: Vec<_> = (0..100u8)
        .map(|n| u.pick(IpAddr::from([10, 0, 0, n]), &[]).unwrap().addr())
        .collect();
    for p in 1..=3 {
        u.set_healthy(a(p), false);
    }
    let after: Vec<_> = (0..100u8)
        .map(|n| u.pick(IpAddr::from([10, 0, 0, n]), &[]).unwrap().addr())
        .collect();
    assert_eq!(before, after);
}

#[tokio::test]
async fn connect_retries_other_servers() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let live = l.local_addr().unwrap();
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let u = Upstream::new(&config::Upstream {
        name: "u".into(),
        servers: vec![
            config::Server {
                addr: dead.into(),
                weight: 1,
            },
            config::Server {
                addr: live.into(),
                weight: 1,
            },
        ],
        balance: config::Balance::RoundRobin,
        connect_timeout: Duration::from_secs(5),
        retries: 1,
        health_check: None,
        resolve: None,
        eject_after: 0,
        eject_for: Duration::from_secs(1),
        http: config::UpstreamHttp::default(),
        tls: None,
    });
    for _ in 0..4 {
        let (_s, g) = u.connect(CLIENT).await.unwrap();
        assert_eq!(g.addr(), live);
    }
    drop(l);
    match u.connect(CLIENT).await {
        Err(ConnectError::Failed { attempts: 2, .. }) => {}
        other => panic!("expected two failed attempts, got {other:?}"),
    }
}

fn spec(port: u16, weight: u32) -> ServerSpec {
    ServerSpec {
        addr: a(port),
        weight,
        name: Some("app.test:1".into()),
    }
}

fn specs(ports: &[u16]) -> Vec<ServerSpec> {
    ports.iter().map(|&p| spec(p, 1)).collect()
}

fn addrs(u: &Upstream) -> Vec<SocketAddr> {
    u.status().iter().map(|s| s.addr).collect()
}

#[test]
fn set_swap_keeps_the_state_of_remaining_servers() {
    let u = pool(config::Balance::RoundRobin, &[], 2, Duration::from_secs(60));
    assert!(
        u.pick(CLIENT, &[]).is_none(),
        "no server before the first swap"
    );
    let c = u.set_servers(&specs(&[1, 2]));
    assert_eq!(c.added, vec![a(1), a(2)]);
    assert!(c.removed.is_empty());
    // Give each server some state: 1 unhealthy, 2 ejected and in use.
    u.set_healthy(a(1), false);
    u.report(a(2), false);
    u.report(a(2), false);
    u.set_healthy(a(1), true);
    let held = u.pick(CLIENT, &[]).unwrap();
    assert_eq!(held.addr(), a(1), "2 is ejected");
    u.set_healthy(a(1), false);
    let before = u.find(a(1)).unwrap();

    let c = u.set_servers(&specs(&[1, 2, 3]));
    assert_eq!(
        c,
        SetChange {
            added: vec![a(3)],
            removed: vec![]
        }
    );
    assert!(
        Arc::ptr_eq(&before, &u.find(a(1)).unwrap()),
        "same state kept"
    );
    let st = u.status();
    assert_eq!(addrs(&u), vec![a(1), a(2), a(3)]);
    assert!(!st[0].healthy && st[0].active == 1);
    assert!(st[1].ejected && st[1].failures == 1);
    assert!(st[2].healthy && !st[2].ejected && st[2].active == 0);
    assert_eq!(st[2].name.as_deref(), Some("app.test:1"));
    for _ in 0..5 {
        assert_eq!(u.pick(CLIENT, &[]).unwrap().addr(), a(3));
    }

    // Server 1 leaves while a connection holds it: never picked again, its guard still works.
    let c = u.set_servers(&specs(&[2, 3]));
    assert_eq!(
        c,
        SetChange {
            added: vec![],
            removed: vec![a(1)]
        }
    );
    assert_eq!(addrs(&u), vec![a(2), a(3)]);
    u.set_healthy(a(1), true);
    u.report(a(1), false);
    for _ in 0..5 {
        assert_eq!(u.pick(CLIENT, &[]).unwrap().addr(), a(3));
    }
    assert_eq!(held.addr(), a(1));
    assert_eq!(before.active.load(Ordering::Relaxed), 1);
    drop(held);
    assert_eq!(before.active.load(Ordering::Relaxed), 0);

    // The same set again changes nothing.
    assert!(u.set_servers(&specs(&[2, 3])).is_empty());
    // A duplicate address keeps its first entry.
    let mut dup = specs(&[2, 3]);
    dup.push(spec(2, 5));
    u.set_servers(&dup);
    assert_eq!(
        u.status().iter().map(|s| s.weight).collect::<Vec<_>>(),
        vec![1, 1]
    );
}

#[test]
fn a_new_weight_keeps_health_and_ejection() {
    let u = pool(config::Balance::RoundRobin, &[], 1, Duration::from_secs(60));
    u.set_servers(&specs(&[1, 2]));
    u.set_healthy(a(1), false);
    u.report(a(2), false);
    let c = u.set_servers(&[spec(1, 3), spec(2, 2)]);
    assert!(c.is_empty());
    let st = u.status();
    assert_eq!((st[0].weight, st[0].healthy), (3, false));
    assert_eq!((st[1].weight, st[1].ejected), (2, true));
}

#[test]
fn static_servers_stay_and_names_join_in_order() {
    let u = pool(
        config::Balance::RoundRobin,
        &[(1, 1)],
        3,
        Duration::from_secs(60),
    );
    assert_eq!(addrs(&u), vec![a(1)]);
    let mut all = vec![ServerSpec {
        addr: a(1),
        weight: 1,
        name: None,
    }];
    all.extend(specs(&[5, 4]));
    u.set_servers(&all);
    assert_eq!(addrs(&u), vec![a(1), a(5), a(4)]);
    assert_eq!(u.status()[0].name, None);
}

#[test]
fn round_robin_stays_weighted_after_swaps() {
    let u = pool(config::Balance::RoundRobin, &[], 3, Duration::from_secs(60));
    u.set_servers(&[spec(1, 3), spec(2, 1)]);
    for _ in 0..3 {
        u.pick(CLIENT, &[]).unwrap();
    }
    u.set_servers(&[spec(1, 3), spec(3, 2), spec(4, 1)]);
    let picks: Vec<SocketAddr> = (0..600)
        .map(|_| u.pick(CLIENT, &[]).unwrap().addr())
        .collect();
    let count = |p| picks.iter().filter(|&&x| x == a(p)).count();
    assert_eq!(count(2), 0, "a removed server is not picked");
    // Exact within a cycle of 6: 300/200/100 over 100 cycles, allowing the carried state's drift.
    assert!(count(1).abs_diff(300) <= 3, "{}", count(1));
    assert!(count(3).abs_diff(200) <= 3, "{}", count(3));
    assert!(count(4).abs_diff(100) <= 3, "{}", count(4));
    // A smooth sequence: the heaviest server never runs more than twice in a row.
    let runs = picks
        .windows(3)
        .filter(|w| w.iter().all(|&x| x == a(1)))
        .count();
    assert_eq!(runs, 0);
}

#[test]
fn hash_client_moves_only_affected_clients_on_a_swap() {
    let u = pool(config::Balance::HashClient, &[], 3, Duration::from_secs(60));
    u.set_servers(&specs(&[1, 2, 3, 4]));
    let clients: Vec<IpAddr> = (0..400u32)
        .map(|n| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n)))
        .collect();
    let map = |u: &Upstream| -> Vec<SocketAddr> {
        clients
            .iter()
            .map(|c| u.pick(*c, &[]).unwrap().addr())
            .collect()
    };
    let before = map(&u);
    // Server 2 leaves and server 5 joins.
    u.set_servers(&specs(&[1, 3, 4, 5]));
    let after = map(&u);
    let mut moved = 0;
    for (b, n) in before.iter().zip(&after) {
        if *b == a(2) {
            assert_ne!(*n, a(2));
            moved += 1;
        } else if n != b {
            // Only to the newcomer, never between servers that stayed.
            assert_eq!(*n, a(5), "a client moved from {b} to {n}");
            moved += 1;
        }
    }
    assert!(moved > 0 && moved < clients.len() / 2, "{moved}");
    assert!(after.contains(&a(5)));
}

#[tokio::test]
async fn health_checks_follow_the_set() {
    let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let live_addr = live.local_addr().unwrap();
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let u = Upstream::new(&config::Upstream {
        name: "u".into(),
        servers: vec![],
        balance: config::Balance::RoundRobin,
        connect_timeout: Duration::from_secs(1),
        retries: 0,
        health_check: Some(config::HealthCheck {
            kind: config::CheckKind::Tcp,
            interval: Duration::from_millis(20),
            timeout: Duration::from_secs(5),
            rise: 1,
            fall: 1,
        }),
        resolve: None,
        eject_after: 0,
        eject_for: Duration::from_secs(1),
        http: config::UpstreamHttp::default(),
        tls: None,
    });
    let shutdown = CancellationToken::new();
    u.spawn_health_checks(shutdown.clone());
    let at = |addr| ServerSpec {
        addr,
        weight: 1,
        name: None,
    };
    assert!(u.lock_checks().checked().is_empty());
    u.set_servers(&[at(live_addr)]);
    assert_eq!(u.lock_checks().checked(), vec![live_addr]);
    // A server added later is checked too: the dead one is marked down.
    u.set_servers(&[at(live_addr), at(dead)]);
    let mut both = vec![live_addr, dead];
    both.sort();
    assert_eq!(u.lock_checks().checked(), both);
    let deadline = Instant::now() + Duration::from_secs(20);
    while u.status()[1].healthy {
        assert!(
            Instant::now() < deadline,
            "the added server was never checked"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(u.status()[0].healthy);
    // A removed server's task stops.
    u.set_servers(&[at(live_addr)]);
    assert_eq!(u.lock_checks().checked(), vec![live_addr]);
    let down = u.counters.marked_down.load(Ordering::Relaxed);
    assert_eq!(down, 1);
    shutdown.cancel();
    drop(live);
}

#[test]
fn local_resource_errors_are_not_held_against_a_server() {
    let u = pool(
        config::Balance::RoundRobin,
        &[(1, 1)],
        1,
        Duration::from_secs(60),
    );
    for errno in [rustix::io::Errno::MFILE, rustix::io::Errno::NFILE] {
        let e = std::io::Error::from_raw_os_error(errno.raw_os_error());
        assert!(!u.report_connect_error(a(1), &e));
    }
    assert_eq!(u.status()[0].failures, 0);
    assert!(!u.status()[0].ejected);
    let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
    assert!(u.report_connect_error(a(1), &refused));
    assert!(
        u.status()[0].ejected,
        "eject_after 1: one real failure ejects"
    );
}
