//! Answers as etcd 3.4's gateway gave them here, for the transactions [`swap`] builds.

use super::*;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const CREATED: &str = r#"{"header":{"cluster_id":"14841639068965178418","member_id":"10276657743932975437","revision":"2","raft_term":"2"},"succeeded":true,"responses":[{"response_put":{"header":{"revision":"2"}}}]}"#;
const EXISTING: &str = r#"{"header":{"cluster_id":"14841639068965178418","member_id":"10276657743932975437","revision":"2","raft_term":"2"},"responses":[{"response_range":{"header":{"revision":"2"},"kvs":[{"key":"azE=","create_revision":"2","mod_revision":"2","version":"1","value":"djE="}],"count":"1"}}]}"#;
const GONE: &str = r#"{"header":{"cluster_id":"14841639068965178418","member_id":"10276657743932975437","revision":"3","raft_term":"2"},"responses":[{"response_range":{"header":{"revision":"3"}}}]}"#;
const REFUSED: &str = r#"{"error":"invalid character 'g' looking for beginning of value","message":"invalid character 'g' looking for beginning of value","code":3}"#;

#[test]
fn a_create_compares_the_create_revision_and_reads_the_key_otherwise() {
    let body: serde_json::Value =
        serde_json::from_slice(&swap(b"k1", &Expected::Absent, b"v1")).unwrap();
    assert_eq!(
        body,
        serde_json::json!({
            "compare": [{"key": "azE=", "result": "EQUAL", "target": "CREATE", "create_revision": "0"}],
            "success": [{"request_put": {"key": "azE=", "value": "djE="}}],
            "failure": [{"request_range": {"key": "azE="}}],
        })
    );
}

#[test]
fn a_swap_compares_the_mod_revision() {
    let body: serde_json::Value = serde_json::from_slice(&swap(
        b"k1",
        &Expected::Revision(9_007_199_254_740_993),
        b"",
    ))
    .unwrap();
    // Past 2^53: the revision travels as a string, never as a lossy JSON number.
    assert_eq!(body["compare"][0]["mod_revision"], "9007199254740993");
    assert_eq!(body["compare"][0]["target"], "MOD");
    assert_eq!(body["success"][0]["request_put"]["value"], "");
}

#[test]
fn a_swap_can_compare_the_whole_value() {
    let body: serde_json::Value =
        serde_json::from_slice(&swap(b"k1", &Expected::Value(b"v1".to_vec()), b"v2")).unwrap();
    assert_eq!(
        body["compare"][0],
        serde_json::json!({"key": "azE=", "result": "EQUAL", "target": "VALUE", "value": "djE="})
    );
}

#[test]
fn answers_read_as_written_found_or_gone() {
    assert_eq!(
        swapped(200, CREATED.as_bytes()),
        Ok(Swapped::Written { revision: 2 })
    );
    assert_eq!(
        swapped(200, EXISTING.as_bytes()),
        Ok(Swapped::Found(Some(Found {
            value: b"v1".to_vec(),
            revision: 2
        })))
    );
    assert_eq!(swapped(200, GONE.as_bytes()), Ok(Swapped::Found(None)));
}

#[test]
fn anything_else_is_an_error_not_a_guess() {
    assert_eq!(
        swapped(400, REFUSED.as_bytes()),
        Err(AnswerError::Status(400))
    );
    assert_eq!(
        swapped(503, b"no healthy upstream"),
        Err(AnswerError::Status(503))
    );
    for body in [
        &b""[..],
        b"{}",
        b"\xff\xfe",
        br#"{"header":{},"succeeded":true}"#,
        br#"{"header":{"revision":"0"},"succeeded":true}"#,
        br#"{"header":{"revision":"-4"},"succeeded":true}"#,
        br#"{"header":{"revision":"2"},"responses":[]}"#,
        br#"{"header":{"revision":"2"},"responses":[{"response_range":{"kvs":[{"value":"!!","mod_revision":"2"}]}}]}"#,
        br#"{"header":{"revision":"2"},"responses":[{"response_range":{"kvs":[{"value":"djE="}]}}]}"#,
    ] {
        assert_eq!(swapped(200, body), Err(AnswerError::Malformed), "{}", String::from_utf8_lossy(body));
    }
}
