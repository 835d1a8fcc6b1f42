//! The configuration document read as a JSON tree, and the typed reader over it.
//!
//! serde's derived deserializers, with the field-path tracking our errors need, were two
//! thirds of the `.wasm` (one monomorphized visitor per struct and per wrapper). The document
//! is parsed once into [`Json`] by serde_json instead, and every section reads its fields from
//! that tree with [`Fields`]: a wrong type, a missing field or an unknown one is an error that
//! names the field's path, the way validation errors do.

use super::ConfigError;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use std::collections::BTreeMap;
use std::fmt;

/// A JSON value, objects kept in document order. A key written twice is refused when the
/// document is read: serde_json's own tree would keep the last one without a word.
#[derive(Clone, Debug, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Unsigned(u64),
    Negative(i64),
    Float(f64),
    String(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    /// Parses one JSON document: nothing but whitespace may follow it. A document that breaks
    /// inside a member is refused at that member's path, with serde_json's line and column.
    pub fn parse(bytes: &[u8]) -> Result<Json, ConfigError> {
        let mut path = Vec::new();
        let mut deserializer = serde_json::Deserializer::from_slice(bytes);
        let parsed = Seed { path: &mut path }
            .deserialize(&mut deserializer)
            .and_then(|json| deserializer.end().map(|()| json));
        parsed.map_err(|err| {
            let at = path
                .iter()
                .fold(String::new(), |at, segment| match segment {
                    Segment::Member(name) => child(&at, name),
                    Segment::Item(i) => format!("{at}[{i}]"),
                });
            ConfigError::at(if at.is_empty() { "." } else { &at }, err.to_string())
        })
    }

    /// The member `name` of an object; `None` for anything else.
    pub fn get(&self, name: &str) -> Option<&Json> {
        match self {
            Json::Object(members) => members.iter().find(|(k, _)| k == name).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(text) => Some(text),
            _ => None,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Json::Null => "null",
            Json::Bool(_) => "a boolean",
            Json::Unsigned(_) | Json::Negative(_) => "an integer",
            Json::Float(_) => "a number with a fraction or exponent",
            Json::String(_) => "a string",
            Json::Array(_) => "an array",
            Json::Object(_) => "an object",
        }
    }

    pub fn expected(&self, what: &str, at: &str) -> ConfigError {
        let at = if at.is_empty() { "." } else { at };
        ConfigError::at(at, format!("expected {what}, found {}", self.kind()))
    }
}

/// Where the parser is: left as it was when the document broke, so the error can name it.
enum Segment {
    Member(String),
    Item(usize),
}

struct Seed<'p> {
    path: &'p mut Vec<Segment>,
}

impl<'de> DeserializeSeed<'de> for Seed<'_> {
    type Value = Json;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Json, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Seed<'_> {
    type Value = Json;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }

    fn visit_bool<E>(self, value: bool) -> Result<Json, E> {
        Ok(Json::Bool(value))
    }

    fn visit_u64<E>(self, value: u64) -> Result<Json, E> {
        Ok(Json::Unsigned(value))
    }

    fn visit_i64<E>(self, value: i64) -> Result<Json, E> {
        Ok(u64::try_from(value).map_or(Json::Negative(value), Json::Unsigned))
    }

    fn visit_f64<E>(self, value: f64) -> Result<Json, E> {
        Ok(Json::Float(value))
    }

    fn visit_str<E>(self, value: &str) -> Result<Json, E> {
        Ok(Json::String(value.to_owned()))
    }

    fn visit_string<E>(self, value: String) -> Result<Json, E> {
        Ok(Json::String(value))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let mut items = Vec::new();
        loop {
            self.path.push(Segment::Item(items.len()));
            let Some(item) = seq.next_element_seed(Seed { path: self.path })? else {
                self.path.pop();
                return Ok(Json::Array(items));
            };
            self.path.pop();
            items.push(item);
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut members: Vec<(String, Json)> = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            let duplicate = members.iter().any(|(k, _)| *k == key);
            self.path.push(Segment::Member(key.clone()));
            if duplicate {
                return Err(de::Error::custom("duplicate field"));
            }
            let value = map.next_value_seed(Seed { path: self.path })?;
            self.path.pop();
            members.push((key, value));
        }
        Ok(Json::Object(members))
    }
}

/// A path below `at`: `at.name`, or `name` at the document's root (whose own path is empty).
/// `text` as a JSON string, quotes included.
pub fn quote(text: &str) -> String {
    // Serializing a str cannot fail.
    serde_json::to_string(text).unwrap_or_default()
}

pub fn child(at: &str, name: &str) -> String {
    if at.is_empty() {
        name.to_owned()
    } else {
        format!("{at}.{name}")
    }
}

/// A configuration value read from the tree at path `at`.
pub trait FromJson: Sized {
    fn from_json(value: Json, at: &str) -> Result<Self, ConfigError>;

    /// What the field's absence means: refused, unless the field is optional.
    fn absent(at: &str) -> Result<Self, ConfigError> {
        Err(ConfigError::at(at, "is required"))
    }
}

/// An object's members, taken one field at a time.
pub struct Fields {
    at: String,
    members: Vec<(String, Json)>,
}

impl Fields {
    /// Refuses anything but an object, and any member not in `known`.
    pub fn new(value: Json, at: &str, known: &[&str]) -> Result<Fields, ConfigError> {
        let Json::Object(members) = value else {
            return Err(value.expected("an object", at));
        };
        if let Some((unknown, _)) = members.iter().find(|(k, _)| !known.contains(&k.as_str())) {
            return Err(ConfigError::at(
                &child(at, unknown),
                format!("unknown field, expected one of `{}`", known.join("`, `")),
            ));
        }
        Ok(Fields {
            at: at.to_owned(),
            members,
        })
    }

    /// Reads the member `name` (one of those [`Fields::new`] knows).
    pub fn take<T: FromJson>(&mut self, name: &str) -> Result<T, ConfigError> {
        let at = child(&self.at, name);
        match self.members.iter().position(|(k, _)| k == name) {
            Some(i) => T::from_json(self.members.swap_remove(i).1, &at),
            None => T::absent(&at),
        }
    }
}

/// `impl FromJson` for a struct whose fields all come from members of one object.
macro_rules! json_object {
    ($ty:ident { $($field:ident: $name:literal),+ $(,)? }) => {
        impl $crate::config::json::FromJson for $ty {
            fn from_json(
                value: $crate::config::json::Json,
                at: &str,
            ) -> Result<Self, $crate::config::ConfigError> {
                let mut fields =
                    $crate::config::json::Fields::new(value, at, &[$($name),+])?;
                Ok($ty { $($field: fields.take($name)?),+ })
            }
        }
    };
}

/// `impl FromJson` for an enum written as one of a few strings.
macro_rules! json_names {
    ($ty:ident { $($variant:ident: $name:literal),+ $(,)? }) => {
        impl $crate::config::json::FromJson for $ty {
            fn from_json(
                value: $crate::config::json::Json,
                at: &str,
            ) -> Result<Self, $crate::config::ConfigError> {
                let text = <String as $crate::config::json::FromJson>::from_json(value, at)?;
                match text.as_str() {
                    $($name => Ok($ty::$variant),)+
                    other => Err($crate::config::json::unknown(other, &[$($name),+], at)),
                }
            }
        }
    };
}

pub(crate) use {json_names, json_object};

/// A name that is none of those the field takes.
pub fn unknown(text: &str, names: &[&str], at: &str) -> ConfigError {
    ConfigError::at(
        at,
        format!(
            "unknown value {text:?}, expected one of `{}`",
            names.join("`, `")
        ),
    )
}

/// A variant [`variant`] read whose name is not among `names`, or is written in the wrong
/// form: bare where it needs a value, or with a value where it takes none.
pub fn misused(name: &str, inner: Option<&Json>, names: &[&str], at: &str) -> ConfigError {
    if !names.contains(&name) {
        return unknown(name, names, at);
    }
    match inner {
        None => ConfigError::at(at, format!("`{name}` needs a value: {{\"{name}\": ...}}")),
        Some(_) => ConfigError::at(at, format!("`{name}` takes no value: write \"{name}\"")),
    }
}

/// An enum written as a bare name (`"client_address"`) or as an object with one member
/// naming the variant (`{"header": "x-api-key"}`): the name, and the member's value if any.
pub fn variant(value: Json, at: &str) -> Result<(String, Option<Json>), ConfigError> {
    match value {
        Json::String(text) => Ok((text, None)),
        Json::Object(mut members) if members.len() == 1 => match members.pop() {
            Some((text, inner)) => Ok((text, Some(inner))),
            None => Err(ConfigError::at(at, "expected one member")),
        },
        other => Err(other.expected("a name, or an object with one member", at)),
    }
}

impl<T: FromJson> FromJson for Option<T> {
    fn from_json(value: Json, at: &str) -> Result<Self, ConfigError> {
        match value {
            Json::Null => Ok(None),
            value => T::from_json(value, at).map(Some),
        }
    }

    fn absent(_: &str) -> Result<Self, ConfigError> {
        Ok(None)
    }
}

impl<T: FromJson> FromJson for Vec<T> {
    fn from_json(value: Json, at: &str) -> Result<Self, ConfigError> {
        let Json::Array(items) = value else {
            return Err(value.expected("an array", at));
        };
        items
            .into_iter()
            .enumerate()
            .map(|(i, item)| T::from_json(item, &format!("{at}[{i}]")))
            .collect()
    }
}

impl<T: FromJson> FromJson for BTreeMap<String, T> {
    fn from_json(value: Json, at: &str) -> Result<Self, ConfigError> {
        let Json::Object(members) = value else {
            return Err(value.expected("an object", at));
        };
        members
            .into_iter()
            .map(|(name, member)| {
                let item = T::from_json(member, &child(at, &name))?;
                Ok((name, item))
            })
            .collect()
    }
}

impl FromJson for String {
    fn from_json(value: Json, at: &str) -> Result<Self, ConfigError> {
        match value {
            Json::String(text) => Ok(text),
            other => Err(other.expected("a string", at)),
        }
    }
}

impl FromJson for bool {
    fn from_json(value: Json, at: &str) -> Result<Self, ConfigError> {
        match value {
            Json::Bool(flag) => Ok(flag),
            other => Err(other.expected("true or false", at)),
        }
    }
}

impl FromJson for f64 {
    fn from_json(value: Json, at: &str) -> Result<Self, ConfigError> {
        match value {
            Json::Float(number) => Ok(number),
            #[allow(clippy::cast_precision_loss)]
            Json::Unsigned(number) => Ok(number as f64),
            #[allow(clippy::cast_precision_loss)]
            Json::Negative(number) => Ok(number as f64),
            other => Err(other.expected("a number", at)),
        }
    }
}

/// Unsigned integers: exactly representable in the field's type, or refused.
macro_rules! unsigned_from_json {
    ($($ty:ty),+) => {$(
        impl FromJson for $ty {
            fn from_json(value: Json, at: &str) -> Result<Self, ConfigError> {
                let out_of_range =
                    || ConfigError::at(at, format!("must be an integer from 0 to {}", <$ty>::MAX));
                match value {
                    Json::Unsigned(number) => <$ty>::try_from(number).map_err(|_| out_of_range()),
                    Json::Negative(_) => Err(out_of_range()),
                    other => Err(other.expected("an integer", at)),
                }
            }
        }
    )+};
}

unsigned_from_json!(u8, u16, u32, u64, usize);

/// Reads `text` as a `T` at path `f`, for tests of one section's piece.
#[cfg(test)]
pub fn read<T: FromJson>(text: &str) -> Result<T, ConfigError> {
    T::from_json(Json::parse(text.as_bytes())?, "f")
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[derive(Debug, PartialEq)]
    struct Pair {
        name: String,
        count: Option<u32>,
    }
    json_object!(Pair {
        name: "name",
        count: "count"
    });

    #[derive(Debug, PartialEq)]
    enum Mode {
        On,
        Off,
    }
    json_names!(Mode {
        On: "on",
        Off: "off"
    });

    #[test]
    fn objects_read_their_fields_and_refuse_unknown_ones() {
        assert_eq!(
            read::<Pair>(r#"{"name": "a", "count": 3}"#),
            Ok(Pair {
                name: "a".into(),
                count: Some(3)
            })
        );
        assert_eq!(
            read::<Pair>(r#"{"name": "a"}"#),
            Ok(Pair {
                name: "a".into(),
                count: None
            })
        );
        let path = |text: &str| read::<Pair>(text).err().map(|e| e.path);
        assert_eq!(path(r#"{"name": "a", "extra": 1}"#), Some("f.extra".into()));
        assert_eq!(path(r#"{"count": 1}"#), Some("f.name".into()));
        assert_eq!(path(r#"{"name": 1}"#), Some("f.name".into()));
        assert_eq!(path(r#"["a"]"#), Some("f".into()));
    }

    #[test]
    fn a_key_written_twice_is_refused_at_its_path() {
        let path = |text: &str| Json::parse(text.as_bytes()).err().map(|e| e.path);
        assert_eq!(path(r#"{"a": 1, "a": 2}"#), Some("a".into()));
        assert_eq!(path(r#"{"a": [{"b": 1, "b": 1}]}"#), Some("a[0].b".into()));
        assert_eq!(path(r#"[{"a": 1}, {"a": 2}]"#), None);
    }

    #[test]
    fn a_broken_document_is_refused_where_it_broke() {
        let error = |text: &str| Json::parse(text.as_bytes()).err();
        assert_eq!(error(r#"{"a": "#).map(|e| e.path), Some("a".into()));
        assert_eq!(
            error(r#"{"a": [1, {"b": tru}]}"#).map(|e| e.path),
            Some("a[1].b".into())
        );
        assert_eq!(error(r#"{"a": 1,}"#).map(|e| e.path), Some(".".into()));
        assert_eq!(error("{} {}").map(|e| e.path), Some(".".into()));
        let reason = error("{\n  \"a\": x}")
            .map(|e| e.reason)
            .unwrap_or_default();
        assert!(reason.contains("line 2 column"), "{reason}");
    }

    #[test]
    fn integers_fit_their_type_exactly_or_are_refused() {
        assert_eq!(read::<u8>("255"), Ok(255));
        assert!(read::<u8>("256").is_err());
        assert!(read::<u32>("-1").is_err());
        assert!(read::<u32>("1.0").is_err());
        assert!(read::<u32>("1e3").is_err());
        assert_eq!(read::<u64>("18446744073709551615"), Ok(u64::MAX));
        assert!(read::<u64>("18446744073709551616").is_err());
        assert_eq!(read::<f64>("2"), Ok(2.0));
        assert!(read::<f64>("\"2\"").is_err());
    }

    #[test]
    fn names_and_variants_are_one_of_a_list() {
        assert_eq!(read::<Mode>(r#""on""#), Ok(Mode::On));
        assert_eq!(read::<Mode>(r#""off""#), Ok(Mode::Off));
        assert!(read::<Mode>(r#""On""#).is_err());
        assert!(read::<Mode>("1").is_err());
        let variant = |text: &str| {
            let json =
                Json::parse(text.as_bytes()).map_err(|e| ConfigError::at(".", e.to_string()))?;
            variant(json, "v")
        };
        assert_eq!(variant(r#""bare""#), Ok(("bare".into(), None)));
        assert_eq!(
            variant(r#"{"inner": 2}"#),
            Ok(("inner".into(), Some(Json::Unsigned(2))))
        );
        assert!(variant(r#"{"inner": 2, "bare": 1}"#).is_err());
        assert!(variant("{}").is_err());
        assert!(variant("[]").is_err());
    }

    /// Review: `{"method": null}` and a bare `"header"` were called unknown values.
    #[test]
    fn a_known_variant_in_the_wrong_form_is_named_as_such() {
        let names = ["method", "header"];
        let reason = |name: &str, inner: Option<&Json>| misused(name, inner, &names, "k").reason;
        assert_eq!(
            reason("header", None),
            "`header` needs a value: {\"header\": ...}"
        );
        assert_eq!(
            reason("method", Some(&Json::Null)),
            "`method` takes no value: write \"method\""
        );
        assert!(reason("cookie", None).starts_with("unknown value \"cookie\""));
    }

    #[test]
    fn null_is_an_absent_optional_field() {
        assert_eq!(read::<Option<u32>>("null"), Ok(None));
        assert!(read::<u32>("null").is_err());
    }
}
