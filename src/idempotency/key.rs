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

/// The key's content, without quotes. The header's value may hold any byte; a key may only
/// hold ASCII, so a value that is not UTF-8 is a [`KeyError::BadCharacter`].
pub fn parse_key(header: &[u8], max_length: usize) -> Result<&str, KeyError> {
    let header = header.trim_ascii();
    let key = match header.strip_prefix(b"\"") {
        Some(rest) => rest.strip_suffix(b"\"").ok_or(KeyError::Malformed)?,
        None => header,
    };
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > max_length {
        return Err(KeyError::TooLong);
    }
    if key.iter().any(|b| b"\"\\;,".contains(b)) {
        // Escapes and parameters are legal Structured Fields, but never part of a sane key.
        return Err(KeyError::Malformed);
    }
    if !key
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b"-_.:~+/=".contains(&b))
    {
        return Err(KeyError::BadCharacter);
    }
    std::str::from_utf8(key).map_err(|_| KeyError::BadCharacter)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn quoted_strings_and_bare_tokens_are_keys() {
        assert_eq!(
            parse_key(br#""8e03978e-40d5-43e8-bc93-6894a57f9324""#, 255),
            Ok("8e03978e-40d5-43e8-bc93-6894a57f9324")
        );
        assert_eq!(parse_key(b"8e03978e-40d5", 255), Ok("8e03978e-40d5"));
        assert_eq!(
            parse_key(b" order:42/retry=1 ", 255),
            Ok("order:42/retry=1")
        );
    }

    #[test]
    fn bad_keys_are_refused_with_a_reason() {
        assert_eq!(parse_key(b"", 255), Err(KeyError::Empty));
        assert_eq!(parse_key(br#""""#, 255), Err(KeyError::Empty));
        assert_eq!(
            parse_key("a".repeat(256).as_bytes(), 255),
            Err(KeyError::TooLong)
        );
        assert_eq!(parse_key(br#""abc"#, 255), Err(KeyError::Malformed));
        assert_eq!(parse_key(br#""a\"b""#, 255), Err(KeyError::Malformed));
        assert_eq!(parse_key(br#""abc";x=1"#, 255), Err(KeyError::Malformed));
        assert_eq!(parse_key(b"a b", 255), Err(KeyError::BadCharacter));
        assert_eq!(
            parse_key("ключ".as_bytes(), 255),
            Err(KeyError::BadCharacter)
        );
        assert_eq!(parse_key(b"a\0b", 255), Err(KeyError::BadCharacter));
    }

    /// Issue 15, defect 1: a key that is not UTF-8 is a malformed key, not a trap.
    #[test]
    fn keys_that_are_not_utf8_are_bad_characters() {
        assert_eq!(parse_key(b"caf\xe9", 255), Err(KeyError::BadCharacter));
        assert_eq!(parse_key(b"\"caf\xe9\"", 255), Err(KeyError::BadCharacter));
        assert_eq!(parse_key(b"\xff\xfe", 255), Err(KeyError::BadCharacter));
    }
}
