//! Which type an OID is: the built-in types read without help (their scalar kinds and array
//! element types, their short names) and the [`TypeRegistry`] of everything else (enums,
//! domains, arrays of those), resolved to the [`Shape`] a value of that type is read as.

use std::collections::HashMap;

use postgres_types::Type;

/// What walsweep knows about a type beyond the built-in ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeInfo {
    /// `schema.name`, for messages.
    pub(crate) name: String,
    pub(crate) kind: TypeKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeKind {
    /// Read as text.
    Enum,
    /// Read as its base type (which may be a domain again, or an array).
    Domain { base: u32 },
    /// An array of `element`, whose elements are separated by `delimiter` (`,` for every type
    /// except `box`).
    Array { element: u32, delimiter: u8 },
    /// Anything else (composite, range, ...): read as text.
    Other,
}

/// Types that are not built in, by OID. Fill it before decoding values of such types; a type it
/// does not know is read as text (which is wrong only for domains over non-text types and for
/// arrays of non-built-in types).
#[derive(Debug, Clone, Default)]
pub struct TypeRegistry {
    types: HashMap<u32, TypeInfo>,
}

/// How deep domains over domains (over arrays of domains...) may nest before it is an error.
pub(super) const MAX_TYPE_DEPTH: usize = 16;

/// The scalar types with a typed reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Scalar {
    Bool,
    Int2,
    Int4,
    Int8,
    Float,
    Numeric,
    Text,
    Bytea,
    Uuid,
    Date,
    Time,
    TimeTz,
    Timestamp,
    TimestampTz,
    Interval,
    Json,
}

/// How a value of a type is read: as one scalar, or as an array literal of `element` values.
pub(super) enum Shape {
    Scalar(Scalar),
    Array { element: u32, delimiter: u8 },
}

/// Domains nest deeper than [`MAX_TYPE_DEPTH`]; `type_oid` is the domain where reading gave up,
/// which the error names.
pub(super) struct DomainsTooDeep {
    pub(super) type_oid: u32,
}

fn builtin_scalar(type_oid: u32) -> Option<Scalar> {
    Some(match Type::from_oid(type_oid)? {
        Type::BOOL => Scalar::Bool,
        Type::INT2 => Scalar::Int2,
        Type::INT4 => Scalar::Int4,
        Type::INT8 => Scalar::Int8,
        Type::FLOAT4 | Type::FLOAT8 => Scalar::Float,
        Type::NUMERIC => Scalar::Numeric,
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::CHAR | Type::NAME => Scalar::Text,
        Type::BYTEA => Scalar::Bytea,
        Type::UUID => Scalar::Uuid,
        Type::DATE => Scalar::Date,
        Type::TIME => Scalar::Time,
        Type::TIMETZ => Scalar::TimeTz,
        Type::TIMESTAMP => Scalar::Timestamp,
        Type::TIMESTAMPTZ => Scalar::TimestampTz,
        Type::INTERVAL => Scalar::Interval,
        Type::JSON | Type::JSONB => Scalar::Json,
        _ => return None,
    })
}

/// The element type of a built-in array type this module reads.
pub fn builtin_array_element(type_oid: u32) -> Option<u32> {
    // Listed rather than taken from `Type::kind()`, which also calls int2vector an array of
    // int2 although its text form has no braces.
    let element = match Type::from_oid(type_oid)? {
        Type::BOOL_ARRAY => Type::BOOL,
        Type::BYTEA_ARRAY => Type::BYTEA,
        Type::CHAR_ARRAY => Type::CHAR,
        Type::NAME_ARRAY => Type::NAME,
        Type::INT2_ARRAY => Type::INT2,
        Type::INT4_ARRAY => Type::INT4,
        Type::INT8_ARRAY => Type::INT8,
        Type::TEXT_ARRAY => Type::TEXT,
        Type::BPCHAR_ARRAY => Type::BPCHAR,
        Type::VARCHAR_ARRAY => Type::VARCHAR,
        Type::FLOAT4_ARRAY => Type::FLOAT4,
        Type::FLOAT8_ARRAY => Type::FLOAT8,
        Type::NUMERIC_ARRAY => Type::NUMERIC,
        Type::UUID_ARRAY => Type::UUID,
        Type::DATE_ARRAY => Type::DATE,
        Type::TIME_ARRAY => Type::TIME,
        Type::TIMETZ_ARRAY => Type::TIMETZ,
        Type::TIMESTAMP_ARRAY => Type::TIMESTAMP,
        Type::TIMESTAMPTZ_ARRAY => Type::TIMESTAMPTZ,
        Type::INTERVAL_ARRAY => Type::INTERVAL,
        Type::JSON_ARRAY => Type::JSON,
        Type::JSONB_ARRAY => Type::JSONB,
        _ => return None,
    };
    Some(element.oid())
}

/// Postgres' short name, with `[]` for an array (`typname` has `_` in front instead).
fn builtin_name(type_oid: u32) -> Option<String> {
    if !is_builtin(type_oid) {
        return None;
    }
    let ty = Type::from_oid(type_oid)?;
    Some(
        match builtin_array_element(type_oid).and_then(Type::from_oid) {
            Some(element) => format!("{}[]", element.name()),
            None => ty.name().to_string(),
        },
    )
}

/// Whether this module reads `type_oid` without help from a registry.
pub fn is_builtin(type_oid: u32) -> bool {
    builtin_scalar(type_oid).is_some() || builtin_array_element(type_oid).is_some()
}

impl TypeRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn insert(&mut self, type_oid: u32, info: TypeInfo) {
        self.types.insert(type_oid, info);
    }

    pub(crate) fn get(&self, type_oid: u32) -> Option<&TypeInfo> {
        self.types.get(&type_oid)
    }

    /// The OIDs among `oids` that are neither built in nor registered, sorted and without
    /// duplicates: what a caller should look up before decoding.
    pub(crate) fn unresolved(&self, oids: impl IntoIterator<Item = u32>) -> Vec<u32> {
        let mut missing: Vec<u32> = oids
            .into_iter()
            .filter(|o| !is_builtin(*o) && !self.types.contains_key(o))
            .collect();
        missing.sort_unstable();
        missing.dedup();
        missing
    }

    /// The type a domain stands for (through domains over domains); any other type itself.
    pub(crate) fn base_type(&self, type_oid: u32) -> u32 {
        let mut current = type_oid;
        // Bounded like the lookup: a catalog cannot nest domains deeper than it resolved.
        for _ in 0..MAX_TYPE_DEPTH {
            match self.get(current).map(|t| &t.kind) {
                Some(TypeKind::Domain { base }) => current = *base,
                _ => break,
            }
        }
        current
    }

    /// A readable name: the built-in short name, the registered `schema.name`, or `type oid N`.
    pub(crate) fn type_name(&self, type_oid: u32) -> String {
        if let Some(name) = builtin_name(type_oid) {
            return name;
        }
        match self.types.get(&type_oid) {
            Some(info) => info.name.clone(),
            None => format!("type oid {type_oid}"),
        }
    }

    /// How a value of `type_oid` is read, through domains to their base type.
    pub(super) fn shape(&self, type_oid: u32, depth: usize) -> Result<Shape, DomainsTooDeep> {
        if let Some(scalar) = builtin_scalar(type_oid) {
            return Ok(Shape::Scalar(scalar));
        }
        if let Some(element) = builtin_array_element(type_oid) {
            return Ok(Shape::Array {
                element,
                delimiter: b',',
            });
        }
        match self.types.get(&type_oid).map(|i| i.kind) {
            Some(TypeKind::Domain { base }) => {
                if depth >= MAX_TYPE_DEPTH {
                    return Err(DomainsTooDeep { type_oid });
                }
                self.shape(base, depth + 1)
            }
            Some(TypeKind::Array { element, delimiter }) => Ok(Shape::Array { element, delimiter }),
            Some(TypeKind::Enum) | Some(TypeKind::Other) | None => Ok(Shape::Scalar(Scalar::Text)),
        }
    }
}

#[cfg(test)]
mod tests {
    use postgres_types::Type;
    use serde_json::json;

    use super::*;
    use crate::value::{decode_text, Value};

    #[test]
    fn registry_resolves_enums_domains_and_their_arrays() {
        let mut types = TypeRegistry::new();
        let info = |name: &str, kind| TypeInfo {
            name: name.into(),
            kind,
        };
        types.insert(90_001, info("public.mood", TypeKind::Enum));
        types.insert(
            90_002,
            info(
                "public.mood[]",
                TypeKind::Array {
                    element: 90_001,
                    delimiter: b',',
                },
            ),
        );
        types.insert(
            90_003,
            info(
                "public.posint",
                TypeKind::Domain {
                    base: Type::INT4.oid(),
                },
            ),
        );
        types.insert(
            90_004,
            info("public.tiny", TypeKind::Domain { base: 90_003 }),
        );
        types.insert(
            90_005,
            info(
                "public.tiny[]",
                TypeKind::Array {
                    element: 90_004,
                    delimiter: b',',
                },
            ),
        );
        types.insert(
            90_006,
            info("public.loop", TypeKind::Domain { base: 90_006 }),
        );
        let dec = |o: u32, t: &str| decode_text(o, t.as_bytes(), &types);
        assert_eq!(dec(90_001, "it's").unwrap(), Value::Text("it's".into()));
        assert_eq!(
            dec(90_002, r#"{sad,"it's \"x\""}"#).unwrap().to_json(),
            json!(["sad", "it's \"x\""])
        );
        assert_eq!(dec(90_004, "5").unwrap(), Value::Int(5));
        assert_eq!(dec(90_005, "{1,NULL}").unwrap().to_json(), json!([1, null]));
        let err = dec(90_004, "x").unwrap_err();
        assert_eq!(err.type_name, "public.tiny");
        let err = dec(90_006, "1").unwrap_err();
        assert!(err.reason.contains("nest"), "{err}");
        // Unknown types are text.
        assert_eq!(dec(123_456, "(1,2)").unwrap(), Value::Text("(1,2)".into()));
        assert_eq!(
            types.unresolved([Type::INT4.oid(), 90_001, 777, 777, 1020, 5]),
            vec![5, 777, 1020]
        );
    }
}
