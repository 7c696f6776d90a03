//! Command-line parsing with exactly the rules of Go's `flag` package, because dockerd (and
//! anyone scripting docker-proxy) speaks that dialect: `-f value`, `-f=value`, `--f`, bare
//! booleans, base-0 integers, last repeat wins, parsing stops at the first non-flag.
//!
//! clap cannot express these rules (a boolean never takes a separate value; `-host-ip` is one
//! long flag with a single dash), so this is a small hand-written parser over a flag table.

use std::collections::HashMap;
use std::fmt;

/// What kind of value a flag takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `-f` or `-f=true|false`; never a separate value.
    Bool,
    /// A base-0 integer (strconv.ParseInt(s, 0, 64)).
    Int,
    /// Any string.
    Str,
}

/// One flag definition: its name (without dashes), kind, default (as shown in usage) and help.
#[derive(Debug, Clone, Copy)]
pub struct Flag {
    /// Its name, without dashes.
    pub name: &'static str,
    /// What value it takes.
    pub kind: Kind,
    /// Its default, as usage shows it.
    pub default: &'static str,
    /// Its help text.
    pub usage: &'static str,
}

/// A parsed value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// A boolean flag's value.
    Bool(bool),
    /// An integer flag's value.
    Int(i64),
    /// A string flag's value.
    Str(String),
}

/// Why parsing stopped, worded as Go words it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// `-h` or `-help` was given and is not defined: print usage, exit 0.
    Help,
    /// A usage error, worded as Go words it: print it and usage, exit 2.
    Invalid(String),
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Help => f.write_str("flag: help requested"),
            ParseError::Invalid(msg) => f.write_str(msg),
        }
    }
}

/// The parsed flags (only those given) and the arguments left after parsing stopped.
#[derive(Debug, Default)]
pub struct Parsed {
    /// The flags given, by name.
    pub values: HashMap<&'static str, Value>,
    /// The arguments after the last flag.
    pub rest: Vec<String>,
}

impl Parsed {
    /// Whether bool flag `name` was given as true.
    pub fn bool(&self, name: &str) -> bool {
        matches!(self.values.get(name), Some(Value::Bool(true)))
    }
    /// Int flag `name`, if given.
    pub fn int(&self, name: &str) -> Option<i64> {
        match self.values.get(name) {
            Some(Value::Int(v)) => Some(*v),
            _ => None,
        }
    }
    /// String flag `name`, if given.
    pub fn str(&self, name: &str) -> Option<&str> {
        match self.values.get(name) {
            Some(Value::Str(v)) => Some(v),
            _ => None,
        }
    }
}

/// Parses `args` (without argv[0]) against `flags`.
pub fn parse(flags: &[Flag], args: &[String]) -> Result<Parsed, ParseError> {
    let mut parsed = Parsed::default();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        // Go: a non-flag ("x", "-") ends parsing and stays in the rest; "--" ends it and is dropped.
        if arg.len() < 2 || !arg.starts_with('-') {
            break;
        }
        let mut name = &arg[1..];
        if let Some(stripped) = name.strip_prefix('-') {
            if stripped.is_empty() {
                i += 1;
                break;
            }
            name = stripped;
        }
        if name.is_empty() || name.starts_with('-') || name.starts_with('=') {
            return Err(ParseError::Invalid(format!("bad flag syntax: {arg}")));
        }
        i += 1;
        let (name, inline) = match name.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (name, None),
        };
        let Some(flag) = flags.iter().find(|f| f.name == name) else {
            if name == "help" || name == "h" {
                return Err(ParseError::Help);
            }
            return Err(ParseError::Invalid(format!(
                "flag provided but not defined: -{name}"
            )));
        };
        let value = match (flag.kind, inline) {
            (Kind::Bool, None) => Value::Bool(true),
            (Kind::Bool, Some(v)) => Value::Bool(parse_bool(v).ok_or_else(|| {
                ParseError::Invalid(format!(
                    "invalid boolean value {:?} for -{name}: parse error",
                    v
                ))
            })?),
            (kind, inline) => {
                let v = match inline {
                    Some(v) => v.to_string(),
                    None => {
                        let Some(next) = args.get(i) else {
                            return Err(ParseError::Invalid(format!(
                                "flag needs an argument: -{name}"
                            )));
                        };
                        i += 1;
                        next.clone()
                    }
                };
                if kind == Kind::Int {
                    Value::Int(parse_int(&v).ok_or_else(|| {
                        ParseError::Invalid(format!(
                            "invalid value {:?} for flag -{name}: parse error",
                            v
                        ))
                    })?)
                } else {
                    Value::Str(v)
                }
            }
        };
        parsed.values.insert(flag.name, value);
    }
    parsed.rest = args[i..].to_vec();
    Ok(parsed)
}

/// Go's strconv.ParseBool: how docker-proxy's boolean flags, and dockerd's network options,
/// are read. Exactly these spellings: not rproxy's own yes/no ([`crate::settings::options::parse_bool`]).
pub fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// strconv.ParseInt(s, 0, 64): optional sign, 0x/0o/0b/0 prefixes, underscores only between
/// digits and only with a base prefix.
fn parse_int(s: &str) -> Option<i64> {
    let (neg, body) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let lower = body.to_ascii_lowercase();
    let (radix, digits, prefixed) = if let Some(d) = lower.strip_prefix("0x") {
        (16, d.to_string(), true)
    } else if let Some(d) = lower.strip_prefix("0o") {
        (8, d.to_string(), true)
    } else if let Some(d) = lower.strip_prefix("0b") {
        (2, d.to_string(), true)
    } else if lower.len() > 1 && lower.starts_with('0') {
        (8, lower[1..].to_string(), true)
    } else {
        (10, lower.clone(), false)
    };
    if digits.contains('_') {
        // Go's underscoreOK: only with a prefix, never leading/trailing/doubled (after the
        // prefix a leading '_' is allowed, e.g. 0x_1f).
        if !prefixed || digits.ends_with('_') || digits.contains("__") {
            return None;
        }
    }
    let clean: String = digits.chars().filter(|&c| c != '_').collect();
    // One sign, before any prefix: Rust's from_str_radix would take a second one ("++80",
    // "0x+50"), Go does not.
    if clean.is_empty() || !clean.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return None;
    }
    let magnitude = u64::from_str_radix(&clean, radix).ok()?;
    if neg {
        if magnitude > i64::MAX as u64 + 1 {
            return None;
        }
        Some((magnitude as i64).wrapping_neg())
    } else {
        i64::try_from(magnitude).ok()
    }
}

/// Go's flag.PrintDefaults layout, preceded by "Usage of PROG:".
pub fn usage(prog: &str, flags: &[Flag]) -> String {
    let mut sorted: Vec<&Flag> = flags.iter().collect();
    sorted.sort_by_key(|f| f.name);
    let mut out = format!("Usage of {prog}:\n");
    for f in sorted {
        let mut line = format!("  -{}", f.name);
        match f.kind {
            Kind::Bool => {}
            Kind::Int => line.push_str(" int"),
            Kind::Str => line.push_str(" string"),
        }
        // Go puts one-letter bool/int flags' usage on the same line; everything else below.
        if line.len() <= 4 {
            line.push('\t');
        } else {
            line.push_str("\n    \t");
        }
        line.push_str(f.usage);
        match f.kind {
            _ if f.default.is_empty() || f.default == "false" || f.default == "0" => {}
            Kind::Str => line.push_str(&format!(" (default {:?})", f.default)),
            _ => line.push_str(&format!(" (default {})", f.default)),
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_integers() {
        for (s, v) in [
            ("80", 80),
            ("0x50", 80),
            ("0X50", 80),
            ("0o120", 80),
            ("0120", 80),
            ("0b1010000", 80),
            ("+80", 80),
            ("-1", -1),
            ("0x_50", 80),
            ("8_0", 80),
            ("0", 0),
        ] {
            let got = parse_int(s);
            if s == "8_0" {
                assert_eq!(got, None, "Go rejects underscores without a base prefix");
            } else {
                assert_eq!(got, Some(v), "{s}");
            }
        }
        for s in [
            "",
            "0x",
            "08",
            "1e3",
            "80a",
            " 80",
            "0x50_",
            "0x5__0",
            "9223372036854775808",
            "++80",
            "+-80",
            "--80",
            "0x+50",
            "0x-50",
            "0+5",
            "0b+1",
        ] {
            assert_eq!(parse_int(s), None, "{s:?} must be rejected");
        }
        assert_eq!(parse_int("-9223372036854775808"), Some(i64::MIN));
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// Every i64, written as Go writes it in any base, parses back to itself.
        #[test]
        fn integers_round_trip(n in any::<i64>()) {
            let (sign, mag) = if n < 0 { ("-", n.unsigned_abs()) } else { ("", n as u64) };
            prop_assert_eq!(parse_int(&n.to_string()), Some(n));
            prop_assert_eq!(parse_int(&format!("{sign}0x{mag:x}")), Some(n));
            prop_assert_eq!(parse_int(&format!("{sign}0o{mag:o}")), Some(n));
            prop_assert_eq!(parse_int(&format!("{sign}0b{mag:b}")), Some(n));
        }

        /// Any string: a value or None, never a panic; a value only from digits Go accepts.
        #[test]
        fn any_string_parses_or_is_refused(s in "[-+0-9a-zA-Z_]{0,24}") {
            if let Some(v) = parse_int(&s) {
                prop_assert!(!s.contains("++") && !s.contains("+-") && !s.contains("--"));
                // Without a base prefix or underscores, Go's result is the plain decimal one.
                if !s.contains(['x', 'X', 'o', 'O', 'b', 'B', '_']) && !s.trim_start_matches(['-', '+']).starts_with('0') {
                    prop_assert_eq!(s.parse::<i64>().ok(), Some(v));
                }
            }
        }

        /// Any argv: parsed or refused with a message, never a panic.
        #[test]
        fn any_argv_parses_or_is_refused(args in proptest::collection::vec(
            prop_oneof![
                Just("-proto".to_string()), Just("-host-port".to_string()),
                Just("--use-listen-fd=maybe".to_string()), Just("-h".to_string()),
                Just("-".to_string()), Just("--".to_string()), Just("-=x".to_string()),
                "-?[-a-z=]{0,12}", ".{0,10}",
            ],
            0..8,
        )) {
            let flags = [
                Flag { name: "proto", kind: Kind::Str, default: "tcp", usage: "" },
                Flag { name: "host-port", kind: Kind::Int, default: "-1", usage: "" },
                Flag { name: "use-listen-fd", kind: Kind::Bool, default: "false", usage: "" },
            ];
            match parse(&flags, &args) {
                Ok(p) => prop_assert!(p.rest.len() <= args.len()),
                Err(ParseError::Invalid(msg)) => prop_assert!(!msg.is_empty()),
                Err(ParseError::Help) => {}
            }
        }
    }
}
