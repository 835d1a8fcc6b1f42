//! The `Idempotency-Key` header: a Structured Field String (draft-ietf-httpapi-idempotency-
//! key-header) such as `"8e03978e-40d5-43e8-bc93-6894a57f9324"`, or the bare token that
//! clients commonly send.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyError {
    Empty,
    TooLong,
    /// A character outside `A-Z a-z 0-9 - _ . : ~ + / =`.
    BadCharacter,
    /// An opening quote without its closing one, a stray escape, or parameters.
    Malformed,
}

/// The key's content, without quotes.
pub fn parse_key(header: &str, max_length: usize) -> Result<&str, KeyError> {
    let header = header.trim_matches(' ');
    let key = match header.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"').ok_or(KeyError::Malformed)?,
        None => header,
    };
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > max_length {
        return Err(KeyError::TooLong);
    }
    if key.contains(['"', '\\', ';', ',']) {
        // Escapes and parameters are legal Structured Fields, but never part of a sane key.
        return Err(KeyError::Malformed);
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.:~+/=".contains(&b))
    {
        return Err(KeyError::BadCharacter);
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn quoted_strings_and_bare_tokens_are_keys() {
        assert_eq!(
            parse_key(r#""8e03978e-40d5-43e8-bc93-6894a57f9324""#, 255),
            Ok("8e03978e-40d5-43e8-bc93-6894a57f9324")
        );
        assert_eq!(parse_key("8e03978e-40d5", 255), Ok("8e03978e-40d5"));
        assert_eq!(parse_key(" order:42/retry=1 ", 255), Ok("order:42/retry=1"));
    }

    #[test]
    fn bad_keys_are_refused_with_a_reason() {
        assert_eq!(parse_key("", 255), Err(KeyError::Empty));
        assert_eq!(parse_key(r#""""#, 255), Err(KeyError::Empty));
        assert_eq!(parse_key(&"a".repeat(256), 255), Err(KeyError::TooLong));
        assert_eq!(parse_key(r#""abc"#, 255), Err(KeyError::Malformed));
        assert_eq!(parse_key(r#""a\"b""#, 255), Err(KeyError::Malformed));
        assert_eq!(parse_key(r#""abc";x=1"#, 255), Err(KeyError::Malformed));
        assert_eq!(parse_key("a b", 255), Err(KeyError::BadCharacter));
        assert_eq!(parse_key("ключ", 255), Err(KeyError::BadCharacter));
        assert_eq!(parse_key("a\u{0}b", 255), Err(KeyError::BadCharacter));
    }
}
