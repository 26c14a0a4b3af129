//! Service names: DNS labels, because a service is reached as `NAME.<domain>`.

use std::fmt;

/// A validated service name: `[a-z0-9-]{1,63}`, no leading or trailing `-`.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct ServiceName(String);

impl TryFrom<String> for ServiceName {
    type Error = ServiceNameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<ServiceName> for String {
    fn from(n: ServiceName) -> Self {
        n.0
    }
}

/// Why a string is not a service name; the message says how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceNameError {
    #[error("the name is empty; give the service a name such as \"hello\"")]
    Empty,
    #[error(
        "{0:?} is {1} characters long; a name is at most 63 characters (it becomes a DNS label)"
    )]
    TooLong(String, usize),
    #[error("{0:?} contains {1:?}; use only lowercase letters a-z, digits and '-' (it becomes a DNS label)")]
    BadChar(String, char),
    #[error("{0:?} starts or ends with '-'; DNS labels cannot, so drop the dash")]
    EdgeDash(String),
}

impl ServiceName {
    /// Checks `s` against the DNS-label rule.
    pub fn parse(s: &str) -> Result<Self, ServiceNameError> {
        if s.is_empty() {
            return Err(ServiceNameError::Empty);
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(ServiceNameError::BadChar(s.to_string(), c));
        }
        if s.len() > 63 {
            return Err(ServiceNameError::TooLong(s.to_string(), s.len()));
        }
        if s.starts_with('-') || s.ends_with('-') {
            return Err(ServiceNameError::EdgeDash(s.to_string()));
        }
        Ok(Self(s.to_string()))
    }

    /// Derives a name from a directory name, for a source directory without one:
    /// `My_App` becomes `my-app`. Returns `None` when nothing usable is left.
    pub fn derive_from(dir_name: &str) -> Option<Self> {
        let mut out = String::new();
        for c in dir_name.chars() {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                out.push(c);
            } else if !out.ends_with('-') {
                out.push('-');
            }
        }
        let trimmed: String = out.trim_matches('-').chars().take(63).collect();
        Self::parse(trimmed.trim_end_matches('-')).ok()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels() {
        for ok in ["a", "hello", "hello-python", "x1", &"a".repeat(63)] {
            assert_eq!(ServiceName::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_with_reason() {
        type Check = fn(&ServiceNameError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("", |e| matches!(e, ServiceNameError::Empty)),
            ("Hello", |e| matches!(e, ServiceNameError::BadChar(_, 'H'))),
            ("a_b", |e| matches!(e, ServiceNameError::BadChar(_, '_'))),
            ("a.b", |e| matches!(e, ServiceNameError::BadChar(_, '.'))),
            ("-a", |e| matches!(e, ServiceNameError::EdgeDash(_))),
            ("a-", |e| matches!(e, ServiceNameError::EdgeDash(_))),
        ];
        for (input, check) in cases {
            let err = ServiceName::parse(input).unwrap_err();
            assert!(check(&err), "{input:?} gave {err:?}");
        }
        let long = "a".repeat(64);
        assert!(matches!(
            ServiceName::parse(&long),
            Err(ServiceNameError::TooLong(_, 64))
        ));
    }

    #[test]
    fn derives_from_directory_names() {
        assert_eq!(
            ServiceName::derive_from("My_App").unwrap().as_str(),
            "my-app"
        );
        assert_eq!(
            ServiceName::derive_from("hello-python").unwrap().as_str(),
            "hello-python"
        );
        assert_eq!(ServiceName::derive_from("__x__").unwrap().as_str(), "x");
        assert!(ServiceName::derive_from("___").is_none());
        assert_eq!(
            ServiceName::derive_from(&"b".repeat(80))
                .unwrap()
                .as_str()
                .len(),
            63
        );
    }
}
