//! Names users type (qubes, templates, volumes, revisions) end up in file names, socket
//! paths and export names: refuse anything that could escape a directory or confuse a
//! terminal, with a message that says what is allowed.

use thiserror::Error;

/// Longest accepted name, in bytes (Qubes allows 31 for qube names; volume names in the
/// pool are longer because they carry a revision suffix).
pub const MAX_NAME_LEN: usize = 120;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error("{what} name is empty; give a name such as `work`")]
    Empty { what: &'static str },
    #[error("{what} name {name:?} is too long ({len} bytes, at most {max})")]
    TooLong {
        what: &'static str,
        name: String,
        len: usize,
        max: usize,
    },
    #[error("{what} name {name:?} contains {bad:?}; use letters, digits, `-`, `_` and `.` only")]
    BadChar {
        what: &'static str,
        name: String,
        bad: char,
    },
    #[error("{what} name {name:?} must start with a letter or a digit")]
    BadStart { what: &'static str, name: String },
    #[error("{what} name {name:?} is reserved (`.` and `..` are path components)")]
    Reserved { what: &'static str, name: String },
}

/// Validates a user-facing name: ASCII letters, digits, `-`, `_`, `.`; starts with a letter
/// or digit; no `/`, no `..`, no control characters. `what` names the kind of thing
/// ("qube", "template", "volume") for the error message.
pub fn validate_name(what: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { what });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong {
            what,
            name: name.escape_debug().to_string(),
            len: name.len(),
            max: MAX_NAME_LEN,
        });
    }
    if name == "." || name == ".." || name.contains("..") {
        return Err(NameError::Reserved {
            what,
            name: name.to_string(),
        });
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(NameError::BadChar {
            what,
            name: name.escape_debug().to_string(),
            bad,
        });
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(NameError::BadStart {
            what,
            name: name.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for n in ["work", "debian-12-minimal", "a", "sys.net", "x_1"] {
            validate_name("qube", n).unwrap();
        }
    }

    #[test]
    fn refuses_path_tricks_and_control_chars() {
        assert!(matches!(
            validate_name("qube", ""),
            Err(NameError::Empty { .. })
        ));
        assert!(matches!(
            validate_name("qube", ".."),
            Err(NameError::Reserved { .. })
        ));
        assert!(matches!(
            validate_name("qube", "a..b"),
            Err(NameError::Reserved { .. })
        ));
        assert!(matches!(
            validate_name("qube", "a/b"),
            Err(NameError::BadChar { bad: '/', .. })
        ));
        assert!(matches!(
            validate_name("qube", "a\nb"),
            Err(NameError::BadChar { .. })
        ));
        assert!(matches!(
            validate_name("qube", "a\u{1b}[31m"),
            Err(NameError::BadChar { .. })
        ));
        assert!(matches!(
            validate_name("qube", "-rf"),
            Err(NameError::BadStart { .. })
        ));
        assert!(matches!(
            validate_name("qube", ".hidden"),
            Err(NameError::BadStart { .. })
        ));
        let long = "a".repeat(MAX_NAME_LEN + 1);
        assert!(matches!(
            validate_name("qube", &long),
            Err(NameError::TooLong { .. })
        ));
    }
}
