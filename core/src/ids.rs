//! Newtypes for every identity and unit that crosses a module boundary.

use std::fmt;

/// A BLAKE3 digest. `Debug` prints a short hex prefix, `Display` the full hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub const ZERO: Digest = Digest([0; 32]);

    pub fn of(data: &[u8]) -> Digest {
        Digest(*blake3::hash(data).as_bytes())
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Digest> {
        <[u8; 32]>::try_from(bytes).ok().map(Digest)
    }

    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    pub fn from_hex(s: &str) -> Option<Digest> {
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Digest(out))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({}…)", &self.to_hex()[..12])
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl From<blake3::Hash> for Digest {
    fn from(h: blake3::Hash) -> Self {
        Digest(*h.as_bytes())
    }
}

/// Sequence number of a journal record within one disk; 1 is the first record, 0 means "none".
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, PartialOrd, Ord)]
pub struct Seq(pub u64);

impl Seq {
    pub fn next(self) -> Seq {
        Seq(self.0 + 1)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A recovery point's id, unique within one process server.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct PointId(pub u64);

impl fmt::Display for PointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("{kind} name is empty")]
    Empty { kind: &'static str },
    #[error("{kind} name {name:?} is longer than 64 characters")]
    TooLong { kind: &'static str, name: String },
    #[error(
        "{kind} name {name:?} may only hold letters, digits, '.', '_' and '-', and must not start with '.' or '-'"
    )]
    BadChar { kind: &'static str, name: String },
}

fn check_name(kind: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { kind });
    }
    if name.len() > 64 {
        // Said by its start: a name of thousands of characters is not echoed whole.
        let start: String = name.chars().take(64).collect();
        return Err(NameError::TooLong { kind, name: format!("{start}...") });
    }
    // A leading '-' reads as a flag on every command line that names it (W19-B: the
    // commands tern printed for such a VM failed).
    if name.starts_with(['.', '-'])
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(NameError::BadChar { kind, name: name.to_string() });
    }
    Ok(())
}

macro_rules! name_type {
    ($t:ident, $kind:literal) => {
        /// A validated name: safe to use as a file name and in certificates.
        #[derive(Clone, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
        pub struct $t(String);

        impl $t {
            pub fn new(name: &str) -> Result<Self, NameError> {
                check_name($kind, name)?;
                Ok($t(name.to_string()))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $t {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                $t::new(s)
            }
        }
    };
}

name_type!(VmName, "VM");
name_type!(DiskName, "disk");
name_type!(GroupName, "group");
name_type!(PlanName, "plan");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(VmName::new("web-01.prod").is_ok());
        assert!(matches!(VmName::new(""), Err(NameError::Empty { .. })));
        assert!(matches!(VmName::new("../etc"), Err(NameError::BadChar { .. })));
        assert!(matches!(DiskName::new("a/b"), Err(NameError::BadChar { .. })));
        assert!(matches!(VmName::new("-x"), Err(NameError::BadChar { .. })), "read as a flag");
        assert!(VmName::new("x-").is_ok());
        let long = VmName::new(&"v".repeat(5000)).unwrap_err().to_string();
        assert!(long.len() < 200 && long.contains("longer than 64"), "{long}");
    }

    #[test]
    fn digest_hex_round_trips() {
        let d = Digest::of(b"tern");
        assert_eq!(Digest::from_hex(&d.to_hex()), Some(d));
        assert_eq!(Digest::from_hex("zz"), None);
    }
}
