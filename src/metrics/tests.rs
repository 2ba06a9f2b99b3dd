#![allow(clippy::unwrap_used)]
use super::*;

fn metrics() -> Arc<Metrics> {
    let m = Arc::new(Metrics::default());
    m.listener("web");
    m.upstream("api");
    m.upstream("");
    m
}

/// Every non-comment line is `name{labels} value` with a float value.
fn check_format(text: &str) {
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').unwrap();
        value.parse::<f64>().unwrap();
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{line}"
        );
        if series.contains('{') {
            assert!(series.ends_with('}'), "{line}");
        }
    }
}

#[test]
fn handles_count_per_series_and_in_totals() {
    let m = metrics();
    let l = m.listener("web");
    l.accepted();
    l.accepted();
    l.closed();
    l.bytes(10, 20);
    m.http_request("api", 204, Duration::from_millis(3));
    m.http_request("nope", 502, Duration::from_secs(100));
    let text = m.render();
    check_format(&text);
    assert!(text.contains("baton_connections_accepted_total 2\n"));
    assert!(text.contains("baton_listener_connections_accepted_total{listener=\"web\"} 2\n"));
    assert!(text.contains("baton_listener_connections_active{listener=\"web\"} 1\n"));
    assert!(text.contains("baton_listener_sent_bytes_total{listener=\"web\"} 20\n"));
    assert!(
        text.contains("baton_upstream_http_responses_total{upstream=\"api\",class=\"2xx\"} 1\n")
    );
    assert!(text.contains("baton_upstream_http_responses_total{upstream=\"\",class=\"5xx\"} 1\n"));
    assert!(text
        .contains("baton_http_request_duration_seconds_bucket{upstream=\"api\",le=\"0.001\"} 0\n"));
    assert!(text
        .contains("baton_http_request_duration_seconds_bucket{upstream=\"api\",le=\"0.005\"} 1\n"));
    // 100 s is past the last bound: only +Inf and count see it.
    assert!(
        text.contains("baton_http_request_duration_seconds_bucket{upstream=\"\",le=\"60\"} 0\n")
    );
    assert!(
        text.contains("baton_http_request_duration_seconds_bucket{upstream=\"\",le=\"+Inf\"} 1\n")
    );
}

#[test]
fn snapshot_survives_json_and_absorb_adds() {
    let old = metrics();
    old.listener("web").accepted();
    old.listener("gone").accepted();
    old.upstream("api").request(500, Duration::from_millis(1));
    old.upstream("api")
        .connect_failure("127.0.0.1:9".parse().unwrap());
    Metrics::inc(&old.upgrades_ok);
    old.record_handover(3, 2, 1);
    let snap = old.snapshot();
    let wire: Counters = serde_json::from_slice(&serde_json::to_vec(&snap).unwrap()).unwrap();
    assert_eq!(wire, snap);

    let new = metrics();
    new.listener("web").accepted();
    new.absorb(&wire);
    let c = new.snapshot();
    assert_eq!(c.accepted, 3);
    assert_eq!(c.listeners["web"].accepted, 2);
    assert_eq!(c.listeners["gone"].accepted, 1);
    assert_eq!(c.upstreams["api"].responses[4], 1);
    assert_eq!(c.upstreams["api"].duration_count, 1);
    assert_eq!(c.upstreams["api"].connect_failures, 1);
    assert_eq!((c.handed_over, c.drained, c.closed_at_deadline), (3, 2, 1));
    assert_eq!(c.upgrades_ok, 1);
    check_format(&new.render());
}

#[test]
fn counters_add_up_every_series_a_dead_worker_had() {
    let a = metrics();
    a.listener("web").accepted();
    a.listener("web").bytes(5, 7);
    a.upstream("api").request(200, Duration::from_millis(1));
    a.upstream("api")
        .connect_failure("127.0.0.1:9".parse().unwrap());
    let b = metrics();
    b.listener("web").accepted();
    b.listener("only_b").accepted();
    b.upstream("api").request(503, Duration::from_millis(2));
    b.record_handover(1, 2, 3);
    let mut sum = a.snapshot();
    sum.add(&b.snapshot());
    assert_eq!(sum.accepted, 3);
    assert_eq!(sum.listeners["web"].accepted, 2);
    assert_eq!(
        (
            sum.listeners["web"].bytes_in,
            sum.listeners["web"].bytes_out
        ),
        (5, 7)
    );
    assert_eq!(sum.listeners["only_b"].accepted, 1);
    let api = &sum.upstreams["api"];
    assert_eq!((api.responses[1], api.responses[4]), (1, 1));
    assert_eq!(api.duration_count, 2);
    assert_eq!(api.servers["127.0.0.1:9"].connect_failures, 1);
    assert_eq!(
        (sum.handed_over, sum.drained, sum.closed_at_deadline),
        (1, 2, 3)
    );
    // Adding nothing changes nothing.
    let before = sum.clone();
    sum.add(&Counters::default());
    assert_eq!(sum, before);
}

#[test]
fn old_counters_without_new_fields_decode() {
    let c: Counters = serde_json::from_str(r#"{"accepted":5,"closed":1,"bytes_in":0,"bytes_out":0,"requests":0,"connect_failures":0,"upgrades_ok":1,"upgrades_failed":0}"#).unwrap();
    assert_eq!(c.accepted, 5);
    assert!(c.listeners.is_empty());
}

#[test]
fn label_values_are_escaped() {
    let m = Arc::new(Metrics::default());
    m.listener("a\"b\\c");
    let text = m.render();
    assert!(text.contains("listener=\"a\\\"b\\\\c\""), "{text}");
}
