//! Cost of one pick (`Upstream::pick` plus dropping its guard) for each balancing algorithm,
//! on a pool of 8 weighted servers, all usable, and with half of them down.
#![allow(clippy::unwrap_used)]

use baton::config::{Balance, Server, Upstream as UpstreamCfg, UpstreamHttp};
use baton::upstream::Upstream;
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

fn pool(balance: Balance) -> std::sync::Arc<Upstream> {
    Upstream::new(&UpstreamCfg {
        name: "bench".into(),
        servers: (0..8u16)
            .map(|i| Server {
                addr: SocketAddr::from(([10, 0, 0, 1], 8000 + i)).into(),
                weight: 1 + u32::from(i % 3),
            })
            .collect(),
        balance,
        connect_timeout: Duration::from_secs(1),
        retries: 2,
        health_check: None,
        resolve: None,
        eject_after: 3,
        eject_for: Duration::from_secs(10),
        http: UpstreamHttp::default(),
        tls: None,
    })
}

fn picks(c: &mut Criterion) {
    let kinds = [
        ("round_robin", Balance::RoundRobin),
        ("least_conn", Balance::LeastConn),
        ("random_two", Balance::RandomTwo),
        ("hash_client", Balance::HashClient),
    ];
    for (name, kind) in kinds {
        let up = pool(kind);
        let mut n: u32 = 0;
        c.bench_function(&format!("pick/{name}/8_servers"), |b| {
            b.iter(|| {
                n = n.wrapping_add(1);
                black_box(up.pick(IpAddr::V4(Ipv4Addr::from(n)), &[]).unwrap().addr())
            })
        });
        let up = pool(kind);
        for i in 0..4u16 {
            up.set_healthy(SocketAddr::from(([10, 0, 0, 1], 8000 + i * 2)), false);
        }
        c.bench_function(&format!("pick/{name}/8_servers_half_down"), |b| {
            b.iter(|| {
                n = n.wrapping_add(1);
                black_box(up.pick(IpAddr::V4(Ipv4Addr::from(n)), &[]).unwrap().addr())
            })
        });
    }
}

criterion_group!(benches, picks);
criterion_main!(benches);
