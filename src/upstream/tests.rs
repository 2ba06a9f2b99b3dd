//! Pool-level unit tests: eligibility, passive ejection and fail-open, on real pools.
#![allow(clippy::unwrap_used)]

use super::*;
use std::time::Duration;

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
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                weight,
            })
            .collect(),
        balance,
        connect_timeout: Duration::from_secs(1),
        retries: 2,
        health_check: None,
        eject_after,
        eject_for,
        http: config::UpstreamHttp::default(),
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
                addr: dead,
                weight: 1,
            },
            config::Server {
                addr: live,
                weight: 1,
            },
        ],
        balance: config::Balance::RoundRobin,
        connect_timeout: Duration::from_secs(5),
        retries: 1,
        health_check: None,
        eject_after: 0,
        eject_for: Duration::from_secs(1),
        http: config::UpstreamHttp::default(),
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
