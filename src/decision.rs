//! Which policy decided a request, and how: what the decision header and Envoy's filter state
//! carry, so that a client, an access log or a later filter can tell a refusal's cause (and,
//! in dry run, the refusal that would have been) without parsing bodies.

/// One policy's answer in place of the upstream's, or in dry run (`shadow`) the refusal it
/// would have made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// `load_shedding`, `rate_limit`, `idempotency` or `circuit_breaker`.
    pub policy: &'static str,
    /// `shed`, `limited`, `open`, `replayed`, `state-unavailable`, or an idempotency problem's
    /// kind (`key-missing`, `key-reused`, ...).
    pub outcome: &'static str,
    /// The pool, rule or breaker that decided, as `("pool", name)`.
    pub subject: Option<(&'static str, String)>,
    /// A shed request's priority class.
    pub class: Option<&'static str>,
    /// Dry run: the request went on.
    pub shadow: bool,
}

impl Decision {
    pub fn new(policy: &'static str, outcome: &'static str) -> Decision {
        Decision {
            policy,
            outcome,
            subject: None,
            class: None,
            shadow: false,
        }
    }

    pub fn of(mut self, kind: &'static str, name: &str) -> Decision {
        self.subject = Some((kind, name.to_owned()));
        self
    }

    pub fn class(mut self, class: &'static str) -> Decision {
        self.class = Some(class);
        self
    }

    pub fn shadow(mut self) -> Decision {
        self.shadow = true;
        self
    }

    /// An RFC 9651 list member: `rate_limit;outcome=limited;rule="per-client"`, with
    /// `;class=...` for a shed request and `;shadow` in dry run. Names are letters, digits,
    /// `_` and `-` (the configuration refuses any other), so they need no escaping.
    fn item(&self, into: &mut String) {
        into.push_str(self.policy);
        into.push_str(";outcome=");
        into.push_str(self.outcome);
        if let Some((kind, name)) = &self.subject {
            into.push(';');
            into.push_str(kind);
            into.push_str("=\"");
            into.push_str(name);
            into.push('"');
        }
        if let Some(class) = self.class {
            into.push_str(";class=");
            into.push_str(class);
        }
        if self.shadow {
            into.push_str(";shadow");
        }
    }
}

/// Appends `decision` to `list`, an RFC 9651 list of a stream's decisions in the order they
/// were made.
pub fn append(list: &mut String, decision: &Decision) {
    if !list.is_empty() {
        list.push_str(", ");
    }
    decision.item(list);
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn list(decisions: &[Decision]) -> String {
        let mut value = String::new();
        decisions.iter().for_each(|d| append(&mut value, d));
        value
    }

    #[test]
    fn decisions_are_one_structured_field_list() {
        let decisions = [
            Decision::new("load_shedding", "shed")
                .of("pool", "search")
                .class("normal")
                .shadow(),
            Decision::new("rate_limit", "limited").of("rule", "per-client"),
            Decision::new("idempotency", "key-missing"),
        ];
        let value = list(&decisions);
        assert_eq!(
            value,
            "load_shedding;outcome=shed;pool=\"search\";class=normal;shadow, \
             rate_limit;outcome=limited;rule=\"per-client\", \
             idempotency;outcome=key-missing"
        );
        assert_eq!(list(&[]), "");
    }

    #[cfg(not(target_arch = "wasm32"))]
    #[test]
    fn the_list_parses_as_rfc_9651() {
        use sfv::{FieldType, List, Parser};
        let value = list(&[
            Decision::new("circuit_breaker", "open").of("breaker", "0-payments_v2"),
            Decision::new("idempotency", "state-unavailable").shadow(),
        ]);
        let parsed: List = Parser::new(&value).parse().expect("a list");
        assert_eq!(parsed.serialize().as_deref(), Some(value.as_str()));
    }
}
