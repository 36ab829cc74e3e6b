//! A VM's name: what `vmm run --name` accepts, and the default it derives
//! from the API socket's file name.

/// Longest VM name (`--name`).
pub const MAX_NAME: usize = 64;

/// A VM's name (`vmm run --name`): 1 to [`MAX_NAME`] ASCII letters, digits,
/// `.`, `_` or `-`, starting with a letter or digit. It appears in the log,
/// in `GET /vpmu` and as the `vm` label of `vmm exporter`'s series, so it
/// can hold nothing that needs quoting anywhere.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VmName(String);

/// Why a `--name` is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("a VM name cannot be empty")]
    Empty,
    #[error("a VM name has at most {MAX_NAME} characters, this one {0}")]
    TooLong(usize),
    #[error("a VM name starts with a letter or digit, not {0:?}")]
    BadStart(char),
    #[error("a VM name holds only letters, digits, '.', '_' and '-', not {0:?}")]
    BadChar(char),
}

impl VmName {
    /// The default name: the API socket's file name without its extension
    /// (`/run/vmm/web-1.sock` → `web-1`), other characters replaced by `_`
    /// and cut to [`MAX_NAME`]; `vm` when that leaves nothing usable.
    pub fn from_socket(socket: Option<&std::path::Path>) -> Self {
        let stem = socket
            .and_then(|p| p.file_stem())
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let cleaned: String = stem
            .chars()
            .map(|c| if Self::allowed(c) { c } else { '_' })
            .take(MAX_NAME)
            .collect();
        let cleaned = cleaned.trim_start_matches(['.', '_', '-']);
        match cleaned.parse() {
            Ok(name) => name,
            Err(_) => Self("vm".into()),
        }
    }

    fn allowed(c: char) -> bool {
        c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for VmName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, NameError> {
        let first = s.chars().next().ok_or(NameError::Empty)?;
        let len = s.chars().count();
        if len > MAX_NAME {
            return Err(NameError::TooLong(len));
        }
        if !first.is_ascii_alphanumeric() {
            return Err(NameError::BadStart(first));
        }
        match s.chars().find(|&c| !Self::allowed(c)) {
            Some(c) => Err(NameError::BadChar(c)),
            None => Ok(Self(s.to_string())),
        }
    }
}

impl std::fmt::Display for VmName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_bounded_safe_words_and_default_to_the_socket() {
        assert_eq!("web-1.a_b".parse::<VmName>().unwrap().as_str(), "web-1.a_b");
        assert_eq!("".parse::<VmName>(), Err(NameError::Empty));
        assert_eq!("-x".parse::<VmName>(), Err(NameError::BadStart('-')));
        assert_eq!("a\"b".parse::<VmName>(), Err(NameError::BadChar('"')));
        assert_eq!("a b".parse::<VmName>(), Err(NameError::BadChar(' ')));
        assert_eq!("é".parse::<VmName>(), Err(NameError::BadStart('é')));
        let long = "a".repeat(MAX_NAME + 1);
        assert_eq!(
            long.parse::<VmName>(),
            Err(NameError::TooLong(MAX_NAME + 1))
        );
        assert!(long[1..].parse::<VmName>().is_ok());
        let of = |p: &str| VmName::from_socket(Some(std::path::Path::new(p))).to_string();
        assert_eq!(of("/run/vmm/web-1.sock"), "web-1");
        assert_eq!(of("/tmp/odd name\"x.sock"), "odd_name_x");
        assert_eq!(of("/tmp/.sock"), "sock");
        assert_eq!(of("/tmp/__.sock"), "vm");
        assert_eq!(
            of(&format!("/tmp/{}.sock", "b".repeat(200))).len(),
            MAX_NAME
        );
        assert_eq!(VmName::from_socket(None).as_str(), "vm");
    }
}
