//! Rate limiting through real Envoy with several workers.

use super::envoy::envoy;
use super::upstream::Upstream;
use super::{fresh_connections, join_all};
use reqwest::{Client, Response};

fn rule(fields: &str) -> String {
    format!(r#"{{"rate_limit": {{"rules": [{{{fields}}}]}}}}"#)
}

/// The statuses of `n` GETs of `url`, one after the other, each with `headers`.
pub(super) async fn statuses(
    client: &Client,
    url: &str,
    n: usize,
    headers: &[(&str, &str)],
) -> Vec<u16> {
    let mut statuses = Vec::new();
    for _ in 0..n {
        let mut request = client.get(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        statuses.push(request.send().await.unwrap().status().as_u16());
    }
    statuses
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|&&s| s == status).count()
}

fn header(response: &Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn one_bucket_per_envoy_admits_exactly_its_capacity_across_workers() {
    let upstream = Upstream::start().await;
    let config =
        rule(r#""name": "global", "capacity": 40, "refill": {"tokens": 1, "interval": "1h"}"#);
    let envoy = envoy()
        .filter("rl", &config)
        .concurrency(4)
        .start(&upstream)
        .await;
    let client = fresh_connections();
    let requests: Vec<_> = (0..200)
        .map(|_| client.get(envoy.url("/")).send())
        .collect();
    let statuses: Vec<u16> = join_all(requests)
        .await
        .into_iter()
        .map(|r| r.unwrap().status().as_u16())
        .collect();

    assert_eq!(count(&statuses, 200), 40, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 160);
    assert_eq!(
        upstream.count(),
        40,
        "refused requests never reach the upstream"
    );
    let per_worker = envoy.connections_per_worker().await;
    assert!(
        per_worker.len() == 4 && per_worker.iter().filter(|&&n| n > 0).count() >= 2,
        "{per_worker:?}"
    );
    assert_eq!(
        envoy
            .stat("wasmcustom.resilience.rl.rate_limit.global.allowed")
            .await,
        Some(40)
    );
    assert_eq!(
        envoy
            .stat("wasmcustom.resilience.rl.rate_limit.global.limited")
            .await,
        Some(160)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_carry_retry_after_and_rate_limit_headers() {
    let upstream = Upstream::start().await;
    let config = r#"{"rate_limit": {"rules": [{"name": "api", "capacity": 2, "refill": {"tokens": 1, "interval": "10s"}}],
        "limited_response": {"body": "{\"error\": \"slow down\"}", "headers": {"content-type": "application/json"}}}}"#;
    let envoy = envoy().filter("rl", config).start(&upstream).await;

    for (protocol, client) in super::clients() {
        let upstream_before = upstream.count();
        let mut admitted = Vec::new();
        let mut refused = None;
        for _ in 0..3 {
            let response = client.get(envoy.url("/")).send().await.unwrap();
            if response.status() == 200 {
                admitted.push(response);
            } else {
                refused = Some(response);
            }
        }
        if protocol == "HTTP/1.1" {
            assert_eq!(admitted.len(), 2, "{protocol}");
            assert_eq!(
                header(&admitted[0], "ratelimit-policy").as_deref(),
                Some("\"api\";q=2;w=20")
            );
            assert_eq!(
                header(&admitted[0], "ratelimit").as_deref(),
                Some("\"api\";r=1;t=10")
            );
            assert_eq!(
                header(&admitted[1], "ratelimit").as_deref(),
                Some("\"api\";r=0;t=10"),
                "t: until the next token (draft-10), not until the bucket is full"
            );
            assert_eq!(upstream.count(), upstream_before + 2);
        } else {
            assert_eq!(
                admitted.len(),
                0,
                "{protocol}: the bucket is shared by both protocols"
            );
            assert_eq!(upstream.count(), upstream_before);
        }
        let refused = refused.unwrap();
        assert_eq!(refused.status(), 429, "{protocol}");
        let retry_after: u64 = header(&refused, "retry-after").unwrap().parse().unwrap();
        assert!(
            (1..=10).contains(&retry_after),
            "{protocol}: Retry-After {retry_after}"
        );
        assert_eq!(
            header(&refused, "ratelimit-policy").as_deref(),
            Some("\"api\";q=2;w=20")
        );
        assert!(
            header(&refused, "ratelimit")
                .unwrap()
                .starts_with("\"api\";r=0;t="),
            "{protocol}"
        );
        assert_eq!(
            header(&refused, "content-type").as_deref(),
            Some("application/json")
        );
        assert!(
            !refused.headers().contains_key("x-upstream-seq"),
            "{protocol}: answered by Envoy"
        );
        assert_eq!(refused.text().await.unwrap(), r#"{"error": "slow down"}"#);
    }
}

/// One item of a `RateLimit` or `RateLimit-Policy` field, read as a strict Structured Field
/// (RFC 9651) with the parameters draft-ietf-httpapi-ratelimit-headers-10 defines.
#[derive(Debug, PartialEq)]
struct DraftItem {
    name: String,
    /// `r` or `q`.
    quota: i64,
    /// `t` or `w`.
    seconds: Option<i64>,
    pk: Option<Vec<u8>>,
}

fn draft_items(response: &Response, field: &str) -> Vec<DraftItem> {
    let values: Vec<_> = response.headers().get_all(field).iter().collect();
    assert_eq!(values.len(), 1, "one {field} line");
    let text = values[0].to_str().unwrap();
    let list: sfv::List = sfv::Parser::new(text)
        .parse()
        .unwrap_or_else(|e| panic!("{field}: {text:?} is not a Structured Field list: {e}"));
    let (quota, seconds) = if field == "ratelimit" {
        ("r", "t")
    } else {
        ("q", "w")
    };
    list.into_iter()
        .map(|entry| {
            let sfv::ListEntry::Item(item) = entry else {
                panic!("{field}: an inner list in {text:?}")
            };
            for (key, _) in &item.params {
                assert!(
                    [quota, seconds, "pk"].contains(&key.as_str()),
                    "{field}: parameter {key} in {text:?}"
                );
            }
            let integer = |key: &str| {
                item.params.get(key).map(|v| {
                    let n = i64::from(
                        v.as_integer()
                            .unwrap_or_else(|| panic!("{key} in {text:?}")),
                    );
                    assert!(n >= 0, "{key} in {text:?}");
                    n
                })
            };
            DraftItem {
                name: item.bare_item.as_string().unwrap().as_str().to_owned(),
                quota: integer(quota).unwrap_or_else(|| panic!("{field}: no {quota} in {text:?}")),
                seconds: integer(seconds),
                pk: item
                    .params
                    .get("pk")
                    .map(|v| v.as_byte_sequence().unwrap().to_vec()),
            }
        })
        .collect()
}

/// Issue 16: every RateLimit header parses as the draft's Structured Field, over a bucket's
/// life: `t` is the time until more quota (what Retry-After also says for a request of one
/// token), keyed rules name their partition (`pk`) without showing the key, a shadow rule
/// never shows, several rules are each listed in `RateLimit-Policy`.
#[tokio::test(flavor = "multi_thread")]
async fn the_ratelimit_headers_are_draft_10_structured_fields_over_time() {
    let upstream = Upstream::start().await;
    let config = r#"{"rate_limit": {"rules": [
        {"name": "per-client", "key": [{"header": "x-client"}], "capacity": 3, "refill": {"tokens": 1, "interval": "1s"}},
        {"name": "heavy", "match": {"path_prefix": "/heavy"}, "cost": 2, "capacity": 4, "refill": {"tokens": 2, "interval": "2s"}},
        {"name": "trial", "shadow": true, "capacity": 1, "refill": {"tokens": 1, "interval": "1h"}}]}}"#;
    let envoy = envoy().filter("rl", config).start(&upstream).await;
    let client = fresh_connections();
    let get = |path: &str, who: &str| client.get(envoy.url(path)).header("x-client", who).send();

    let first = get("/", "alice").await.unwrap();
    assert_eq!(first.status(), 200);
    let policy = draft_items(&first, "ratelimit-policy");
    let state = draft_items(&first, "ratelimit");
    let alice = state[0].pk.clone().unwrap();
    assert_eq!(
        policy,
        vec![DraftItem {
            name: "per-client".into(),
            quota: 3,
            seconds: Some(3),
            pk: Some(alice.clone())
        }]
    );
    assert_eq!(
        state,
        vec![DraftItem {
            name: "per-client".into(),
            quota: 2,
            seconds: Some(1),
            pk: Some(alice.clone())
        }]
    );
    assert_eq!(alice.len(), 8);
    assert!(
        !alice.windows(5).any(|w| w == b"alice"),
        "the key is not shown"
    );

    let bob = get("/", "bob").await.unwrap();
    let bob_pk = draft_items(&bob, "ratelimit")[0].pk.clone().unwrap();
    assert_ne!(bob_pk, alice, "one partition per client");

    // Two rules: both in the policy, the one with fewer tokens left in RateLimit.
    let heavy = get("/heavy", "alice").await.unwrap();
    assert_eq!(heavy.status(), 200);
    let policy = draft_items(&heavy, "ratelimit-policy");
    assert_eq!(
        policy
            .iter()
            .map(|p| (p.name.as_str(), p.quota, p.pk.is_some()))
            .collect::<Vec<_>>(),
        vec![("per-client", 3, true), ("heavy", 4, false)]
    );
    let state = draft_items(&heavy, "ratelimit");
    assert_eq!((state[0].name.as_str(), state[0].quota), ("per-client", 1));

    // Alice's last token, then a refusal: Retry-After and t name the same second.
    assert_eq!(get("/", "alice").await.unwrap().status(), 200);
    let refused = get("/", "alice").await.unwrap();
    assert_eq!(refused.status(), 429);
    let state = draft_items(&refused, "ratelimit");
    assert_eq!((state[0].quota, state[0].pk.as_ref()), (0, Some(&alice)));
    let retry_after: i64 = header(&refused, "retry-after").unwrap().parse().unwrap();
    assert_eq!(state[0].seconds, Some(retry_after));
    assert_eq!(
        retry_after, 1,
        "a token a second, not the 3 s to refill the bucket"
    );
    assert_eq!(
        header(&refused, "content-type").as_deref(),
        Some("application/problem+json")
    );
    let problem: serde_json::Value =
        serde_json::from_slice(&refused.bytes().await.unwrap()).unwrap();
    assert_eq!(
        problem,
        serde_json::json!({
            "type": "https://iana.org/assignments/http-problem-types#quota-exceeded",
            "title": "Quota exceeded",
            "status": 429,
            "detail": "rate limited by rule per-client",
            "violated-policies": ["per-client"],
        }),
        "the draft's problem type (section 5.1)"
    );

    // A request of two tokens refused with one left: more quota comes before the request
    // can pass, and Retry-After is never earlier than t.
    let carol = || get("/heavy", "carol");
    let mut refused_heavy = None;
    for _ in 0..3 {
        let response = carol().await.unwrap();
        if response.status() == 429 {
            refused_heavy = Some(response);
            break;
        }
    }
    let refused_heavy = refused_heavy.expect("heavy refuses a third request of 2 tokens");
    let state = draft_items(&refused_heavy, "ratelimit");
    assert_eq!(state[0].name, "heavy");
    let retry_after: i64 = header(&refused_heavy, "retry-after")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        state[0].seconds.unwrap() <= retry_after,
        "{state:?}, Retry-After {retry_after}"
    );
    assert_eq!(header(&refused_heavy, "retry-after").iter().count(), 1);

    // A second later Alice has one token again: admitted, none left, the next one in 1 s.
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let again = get("/", "alice").await.unwrap();
    assert_eq!(again.status(), 200);
    let state = draft_items(&again, "ratelimit");
    assert_eq!((state[0].quota, state[0].seconds), (0, Some(1)));
}

#[tokio::test(flavor = "multi_thread")]
async fn shadow_rules_count_would_be_refusals_and_refuse_nothing() {
    let upstream = Upstream::start().await;
    let config = rule(
        r#""name": "trial", "shadow": true, "capacity": 3, "refill": {"tokens": 1, "interval": "1h"}"#,
    );
    let envoy = envoy().filter("rl", &config).start(&upstream).await;
    let statuses = statuses(&fresh_connections(), &envoy.url("/"), 10, &[]).await;
    assert_eq!(count(&statuses, 200), 10);
    assert_eq!(upstream.count(), 10);
    assert_eq!(
        envoy
            .stat("wasmcustom.resilience.rl.rate_limit.trial.allowed")
            .await,
        Some(3)
    );
    assert_eq!(
        envoy
            .stat("wasmcustom.resilience.rl.rate_limit.trial.shadow_limited")
            .await,
        Some(7)
    );
    assert_eq!(
        envoy
            .stat("wasmcustom.resilience.rl.rate_limit.trial.limited")
            .await,
        Some(0)
    );
}

/// A client following the RateLimit headers never sees a shadow rule: before, a trial rule
/// showed as `"trial";r=0;t=3600` and told it to stop for an hour.
#[tokio::test(flavor = "multi_thread")]
async fn a_shadow_rule_never_shows_in_the_ratelimit_headers() {
    let upstream = Upstream::start().await;
    let config = r#"{"rate_limit": {"rules": [
        {"name": "trial", "shadow": true, "capacity": 1, "refill": {"tokens": 1, "interval": "1h"}},
        {"name": "real", "capacity": 100, "refill": {"tokens": 1, "interval": "1s"}}]}}"#;
    let envoy = envoy().filter("rl", config).start(&upstream).await;
    let client = fresh_connections();
    for _ in 0..3 {
        let response = client.get(envoy.url("/")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            header(&response, "ratelimit-policy").as_deref(),
            Some("\"real\";q=100;w=100")
        );
        let state = header(&response, "ratelimit").unwrap();
        assert!(state.starts_with("\"real\";r="), "{state}");
    }
    assert_eq!(upstream.count(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_keys_do_not_share_tokens() {
    let upstream = Upstream::start().await;
    let config = rule(
        r#""name": "per-key", "key": [{"header": "x-api-key"}], "capacity": 3, "refill": {"tokens": 1, "interval": "1h"}"#,
    );
    let envoy = envoy().filter("rl", &config).start(&upstream).await;
    let client = fresh_connections();
    let alice = statuses(&client, &envoy.url("/"), 5, &[("x-api-key", "alice")]).await;
    let bob = statuses(&client, &envoy.url("/"), 5, &[("x-api-key", "bob")]).await;
    let keyless = statuses(&client, &envoy.url("/"), 5, &[]).await;
    assert_eq!(alice, [200, 200, 200, 429, 429]);
    assert_eq!(bob, [200, 200, 200, 429, 429]);
    assert_eq!(keyless, [200; 5], "no key: the rule is skipped");
    assert_eq!(upstream.count(), 11);
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarded_for_is_trusted_only_through_the_configured_hops() {
    let upstream = Upstream::start().await;
    let per_client = r#""name": "per-client", "key": ["client_address"], "capacity": 2, "refill": {"tokens": 1, "interval": "1h"}"#;
    let trusting =
        format!(r#"{{"rate_limit": {{"trusted_hops": 1, "rules": [{{{per_client}}}]}}}}"#);
    let trusting = envoy().filter("rl", &trusting).start(&upstream).await;
    let client = fresh_connections();
    let url = trusting.url("/");
    assert_eq!(
        statuses(&client, &url, 3, &[("x-forwarded-for", "192.0.2.1")]).await,
        [200, 200, 429]
    );
    // A client forging an extra entry in front still lands on its real address's bucket.
    assert_eq!(
        statuses(
            &client,
            &url,
            2,
            &[("x-forwarded-for", "198.51.100.7, 192.0.2.1")]
        )
        .await,
        [429, 429]
    );
    assert_eq!(
        statuses(&client, &url, 3, &[("x-forwarded-for", "192.0.2.2")]).await,
        [200, 200, 429]
    );
    drop(trusting);

    // Without trusted hops the header is ignored: every request is the peer 127.0.0.1.
    let untrusting = envoy()
        .filter("rl2", &rule(per_client))
        .start(&upstream)
        .await;
    let url = untrusting.url("/");
    assert_eq!(
        statuses(&client, &url, 2, &[("x-forwarded-for", "192.0.2.1")]).await,
        [200, 200]
    );
    assert_eq!(
        statuses(&client, &url, 1, &[("x-forwarded-for", "192.0.2.2")]).await,
        [429]
    );
}

/// Runs wrk for `seconds` against `url`. With a `run` number, every request goes to a path
/// under `/k/` never used before (the number keeps successive runs apart).
fn wrk(url: &str, run: Option<u32>, seconds: u32) {
    let mut command = std::process::Command::new("wrk");
    command.args(["-t2", "-c32", &format!("-d{seconds}s")]);
    if let Some(run) = run {
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/distinct_paths.lua");
        command
            .arg("-s")
            .arg(script)
            .args([url, "--", &run.to_string()]);
    } else {
        command.arg(url);
    }
    let output = command
        .output()
        .expect("run wrk (apt-get install wrk, or `make setup`)");
    assert!(
        output.status.success(),
        "wrk: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The documented budget: a slot costs under 256 bytes of Envoy memory (measured: about 170).
const BYTES_PER_SLOT_BUDGET: u64 = 256;

#[tokio::test(flavor = "multi_thread")]
async fn a_million_distinct_keys_leave_memory_within_the_table_budget() {
    const TABLE_SIZE: u64 = 20_000;
    const KEYS: u64 = 1_000_000;
    let upstream = Upstream::start().await;
    let config = rule(&format!(
        r#""name": "per-path", "match": {{"path_prefix": "/k/"}}, "key": ["path"], "table_size": {TABLE_SIZE}, "capacity": 5, "refill": {{"tokens": 5, "interval": "1s"}}"#
    ));
    let envoy = envoy()
        .filter("mem", &config)
        .direct_response()
        .start(&upstream)
        .await;
    let url = envoy.url("/");
    // Warm Envoy's own buffers and connection state, on a path the rule ignores.
    wrk(&envoy.url("/warm-up"), None, 2);
    let warm_up_requests = envoy
        .stat("wasmcustom.resilience.mem.requests")
        .await
        .unwrap();
    let baseline = envoy.rss_bytes();
    let mut run = 1;
    let mut after_table_filled = None;
    loop {
        wrk(&url, Some(run), 10);
        run += 1;
        let keys = envoy
            .stat("wasmcustom.resilience.mem.requests")
            .await
            .unwrap()
            - warm_up_requests;
        if after_table_filled.is_none() && keys >= 10 * TABLE_SIZE {
            after_table_filled = Some(envoy.rss_bytes());
        }
        if keys >= KEYS {
            break;
        }
        assert!(run < 60, "too slow: {keys} keys after {run} runs");
    }
    let end = envoy.rss_bytes();
    let after_table_filled = after_table_filled.unwrap();
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    eprintln!(
        "RSS: baseline {:.1} MiB, table filled {:.1} MiB, after {KEYS} keys {:.1} MiB",
        mib(baseline),
        mib(after_table_filled),
        mib(end)
    );
    assert!(
        end.saturating_sub(baseline) <= TABLE_SIZE * BYTES_PER_SLOT_BUDGET + (2 << 20),
        "grew {:.1} MiB, budget {:.1} MiB",
        mib(end - baseline),
        mib(TABLE_SIZE * BYTES_PER_SLOT_BUDGET)
    );
    // One key per client would have grown by ~170 MB; a full table does not grow at all.
    assert!(
        end.saturating_sub(after_table_filled) <= 2 << 20,
        "kept growing after the table filled"
    );
    assert_eq!(upstream.count(), 0);
}
