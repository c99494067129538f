//! Identifiers. `AgentId` becomes a file name, so it is validated on creation.

use std::fmt;

/// Index of one KV block in the pool. A block holds `block_size` token slots of
/// K and V for every layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

impl BlockId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Monotonic id of one request inside a server process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "req-{:08x}", self.0)
    }
}

/// An agent (session) id: `[A-Za-z0-9_.-]{1,128}` and never containing `..`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentIdError {
    #[error("agent id must be 1 to 128 characters, got {0}")]
    Length(usize),
    #[error("agent id may only contain A-Z a-z 0-9 _ . - (found {0:?})")]
    Character(char),
    #[error("agent id must not contain `..`")]
    DotDot,
}

impl AgentId {
    pub const MAX_LEN: usize = 128;

    pub fn new(id: &str) -> Result<Self, AgentIdError> {
        if id.is_empty() || id.len() > Self::MAX_LEN {
            return Err(AgentIdError::Length(id.chars().count()));
        }
        if let Some(c) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))) {
            return Err(AgentIdError::Character(c));
        }
        if id.contains("..") {
            return Err(AgentIdError::DotDot);
        }
        Ok(Self(id.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_ids_are_validated() {
        for ok in ["a", "coder-1", "A.b_c-9", &"x".repeat(128)] {
            assert_eq!(AgentId::new(ok).unwrap().as_str(), ok);
        }
        assert_eq!(AgentId::new(""), Err(AgentIdError::Length(0)));
        assert_eq!(AgentId::new(&"x".repeat(129)), Err(AgentIdError::Length(129)));
        assert_eq!(AgentId::new("a/b"), Err(AgentIdError::Character('/')));
        assert_eq!(AgentId::new("a b"), Err(AgentIdError::Character(' ')));
        assert_eq!(AgentId::new("é"), Err(AgentIdError::Character('é')));
        assert_eq!(AgentId::new(".."), Err(AgentIdError::DotDot));
        assert_eq!(AgentId::new("a..b"), Err(AgentIdError::DotDot));
    }
}
