//! Renders a Postgres text value the way Python's `str()` renders the value a Python driver
//! (psycopg) hands the app, because matroska-cache builds dependency and scope strings with
//! `str()`. The replication session runs with `TimeZone=UTC`, `DateStyle=ISO` and
//! `extra_float_digits=3`, so the input forms below are the only ones to expect. The conversion
//! itself is `value`'s (one typed conversion for JSON and Python forms); enums and domains
//! render through the type registry the stream resolves.

pub use crate::value::{python_str, PYTHON_NONE as NONE};

#[cfg(test)]
mod tests {
    use postgres_types::Type;

    use crate::value::TypeRegistry;

    fn python_str(type_oid: u32, text: &str) -> String {
        super::python_str(type_oid, text, &TypeRegistry::new()).into_owned()
    }

    #[test]
    fn booleans_and_passthrough_types() {
        assert_eq!(python_str(Type::BOOL.oid(), "t"), "True");
        assert_eq!(python_str(Type::BOOL.oid(), "f"), "False");
        assert_eq!(python_str(1700, "1.50"), "1.50");
        assert_eq!(python_str(1082, "2020-01-02"), "2020-01-02");
        assert_eq!(python_str(25, "x y"), "x y");
    }

    #[test]
    fn floats_follow_python_repr() {
        for (pg, py) in [
            ("1.5", "1.5"),
            ("100", "100.0"),
            ("1e+15", "1000000000000000.0"),
            ("1e+16", "1e+16"),
            ("1.5e+20", "1.5e+20"),
            ("0.0001", "0.0001"),
            ("1e-05", "1e-05"),
            ("-2.5e-07", "-2.5e-07"),
            ("0", "0.0"),
            ("-0", "-0.0"),
            ("NaN", "nan"),
            ("-Infinity", "-inf"),
            ("0.1", "0.1"),
            ("123456.789", "123456.789"),
        ] {
            assert_eq!(python_str(Type::FLOAT8.oid(), pg), py, "{pg}");
        }
    }

    #[test]
    fn timestamps_get_six_digit_fractions_and_full_offsets() {
        assert_eq!(
            python_str(Type::TIMESTAMPTZ.oid(), "2020-01-02 03:04:05+00"),
            "2020-01-02 03:04:05+00:00"
        );
        assert_eq!(
            python_str(Type::TIMESTAMPTZ.oid(), "2020-01-02 03:04:05.5+00"),
            "2020-01-02 03:04:05.500000+00:00"
        );
        assert_eq!(
            python_str(Type::TIMESTAMP.oid(), "2020-01-02 03:04:05.123"),
            "2020-01-02 03:04:05.123000"
        );
        assert_eq!(
            python_str(Type::TIMESTAMP.oid(), "2020-01-02 03:04:05"),
            "2020-01-02 03:04:05"
        );
        assert_eq!(
            python_str(Type::TIME.oid(), "03:04:05.25"),
            "03:04:05.250000"
        );
        assert_eq!(
            python_str(Type::TIMESTAMPTZ.oid(), "2020-01-02 03:04:05+05:30"),
            "2020-01-02 03:04:05+05:30"
        );
    }
}
