//! An in-memory etcd that answers the transactions [`super::swap`] builds as the gateway
//! does (the shapes in `tests.rs` were taken from etcd 3.4), for tests of the fleet tier.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

/// A value and the revision that last wrote it.
type Versioned = (Vec<u8>, i64);

#[derive(Default)]
pub struct FakeEtcd {
    kv: RefCell<HashMap<Vec<u8>, Versioned>>,
    revision: Cell<i64>,
    /// While set, every call fails as a timeout would.
    pub down: Cell<bool>,
    /// Transactions answered.
    pub calls: Cell<u32>,
    /// The next this many transactions are applied, but their answers are lost.
    pub lose_answers: Cell<u32>,
}

impl FakeEtcd {
    /// The answer to a `POST /v3/kv/txn` with `body`, as the host hands it to the core.
    pub fn answer(&self, body: &[u8]) -> Option<(u16, Vec<u8>)> {
        if self.down.get() {
            return None;
        }
        self.calls.set(self.calls.get() + 1);
        let answer = self.apply(body);
        if self.lose_answers.get() > 0 {
            self.lose_answers.set(self.lose_answers.get() - 1);
            return None;
        }
        answer
    }

    fn apply(&self, body: &[u8]) -> Option<(u16, Vec<u8>)> {
        let txn: Value = serde_json::from_slice(body).ok()?;
        let compare = &txn["compare"][0];
        let key = STANDARD.decode(compare["key"].as_str()?).ok()?;
        let current = self.kv.borrow().get(&key).cloned();
        let holds = match compare["target"].as_str()? {
            "CREATE" => current.is_none(),
            "MOD" => {
                current.as_ref().map(|c| c.1.to_string()).as_deref()
                    == compare["mod_revision"].as_str()
            }
            "VALUE" => {
                current.as_ref().map(|c| STANDARD.encode(&c.0)).as_deref()
                    == compare["value"].as_str()
            }
            _ => return None,
        };
        let header = |revision: i64| json!({"cluster_id": "1", "revision": revision.to_string()});
        if holds {
            let put = &txn["success"][0]["request_put"];
            let value = STANDARD.decode(put["value"].as_str()?).ok()?;
            let revision = self.revision.get() + 1;
            self.revision.set(revision);
            self.kv.borrow_mut().insert(key, (value, revision));
            let body = json!({"header": header(revision), "succeeded": true,
                "responses": [{"response_put": {"header": {"revision": revision.to_string()}}}]});
            return Some((200, body.to_string().into_bytes()));
        }
        let kvs: Vec<Value> = current
            .map(|(value, revision)| {
                json!({"key": compare["key"], "mod_revision": revision.to_string(),
                       "value": STANDARD.encode(value)})
            })
            .into_iter()
            .collect();
        let range = if kvs.is_empty() {
            json!({})
        } else {
            json!({"kvs": kvs, "count": "1"})
        };
        let body = json!({"header": header(self.revision.get()),
            "responses": [{"response_range": range}]});
        Some((200, body.to_string().into_bytes()))
    }

    /// Every value stored, by key.
    pub fn values(&self) -> HashMap<Vec<u8>, Vec<u8>> {
        self.kv
            .borrow()
            .iter()
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect()
    }
}
