//! Who may do what. With `--tokens FILE`, every REST and gRPC job call carries `Authorization:
//! Bearer SECRET`; the file lists each secret's SHA-256 (never the secret itself) with the user it
//! stands for and that user's role. An `admin` may act on any job; a `user` sees every job but
//! cancels and deletes only its own. Without tokens, every caller is an anonymous admin: such a
//! daemon listens on loopback only (see `config`), for one trusted user. Workers authenticate
//! apart, with a secret per job attempt (`worker`). See docs/security.md.

pub mod worker;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// What a caller may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Any job.
    Admin,
    /// Submits jobs; sees every job; cancels and deletes its own.
    User,
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Role, String> {
        match s {
            "admin" => Ok(Role::Admin),
            "user" => Ok(Role::User),
            other => Err(format!("`{other}` is not a role: use admin or user")),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Admin => "admin",
            Role::User => "user",
        })
    }
}

/// Who made a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The token's user; `None` on a daemon without tokens.
    pub user: Option<String>,
    pub role: Role,
}

impl Caller {
    /// Anyone, on a daemon without tokens.
    pub fn anonymous() -> Caller {
        Caller { user: None, role: Role::Admin }
    }

    /// Whether the caller may cancel or delete a job `owner` submitted.
    pub fn may_change(&self, owner: Option<&str>) -> bool {
        self.role == Role::Admin || (self.user.is_some() && self.user.as_deref() == owner)
    }

    /// Refuses (403) what the caller may not do to job `id` of `owner`.
    pub fn check_may_change(&self, id: i64, owner: Option<&str>, what: &str) -> Result<()> {
        if self.may_change(owner) {
            return Ok(());
        }
        Err(Error::Forbidden(format!(
            "{} may not {what} job {id}: it belongs to {} (a user acts on its own jobs; an admin on any)",
            self.user.as_deref().unwrap_or("this caller"),
            owner.unwrap_or("nobody")
        )))
    }
}

/// One `[[token]]` of the tokens file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    pub user: String,
    pub role: Role,
    /// Hex SHA-256 of the secret.
    pub token_sha256: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    token: Vec<TokenEntry>,
}

/// A user name: what jobs record as their owner and messages show.
pub fn check_user_name(name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || "._@-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!("`{name}` is not a user name: 1 to 64 characters of A-Z a-z 0-9 . _ @ -"))
    }
}

/// The hex SHA-256 of a secret, as the tokens file stores it.
pub fn sha256_hex(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A new secret: 32 random bytes from the OS, in hex, after a prefix that says what it is (so a
/// secret pasted in the wrong place can be recognised).
pub fn new_secret() -> Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| Error::Internal(format!("reading random bytes from the OS: {e}")))?;
    Ok(format!("gantry_{}", hex::encode(bytes)))
}

/// The users of a tokens file, by the SHA-256 of their secrets.
fn parse_tokens(path: &Path, text: &str) -> Result<HashMap<[u8; 32], (String, Role)>> {
    let bad = |m: String| Error::BadRequest(format!("tokens file {}: {m}", path.display()));
    let file: TokensFile = toml::from_str(text).map_err(|e| bad(e.message().to_string()))?;
    let mut by_hash = HashMap::new();
    for (i, t) in file.token.iter().enumerate() {
        let at = format!("token {} ({})", i + 1, t.user);
        check_user_name(&t.user).map_err(|m| bad(format!("{at}: {m}")))?;
        let hash: [u8; 32] = hex::decode(t.token_sha256.trim())
            .ok()
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| bad(format!("{at}: token_sha256 must be 64 hex digits (the SHA-256 of the secret; see `gantry token new`)")))?;
        if by_hash.insert(hash, (t.user.clone(), t.role)).is_some() {
            return Err(bad(format!("{at}: the same secret is listed twice")));
        }
    }
    Ok(by_hash)
}

struct Loaded {
    by_hash: HashMap<[u8; 32], (String, Role)>,
    modified: Option<SystemTime>,
    checked: Instant,
}

/// The tokens file, read again when it changes (looked at once a second at most), so users can be
/// added or revoked without restarting the daemon. A file that no longer parses keeps the last
/// good list, with a warning.
pub struct Tokens {
    path: PathBuf,
    loaded: Mutex<Loaded>,
}

impl Tokens {
    pub fn load(path: &Path) -> Result<Tokens> {
        let (text, modified) = read(path)?;
        let by_hash = parse_tokens(path, &text)?;
        if by_hash.is_empty() {
            tracing::warn!("the tokens file {} lists no token: every job call will be refused", path.display());
        }
        warn_if_open(path);
        Ok(Tokens { path: path.to_path_buf(), loaded: Mutex::new(Loaded { by_hash, modified, checked: Instant::now() }) })
    }

    /// How many tokens are listed.
    pub fn len(&self) -> usize {
        self.loaded.lock().expect("tokens").by_hash.len()
    }

    /// The caller a secret stands for.
    pub fn caller(&self, secret: &str) -> Option<Caller> {
        let hash: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let mut loaded = self.loaded.lock().expect("tokens");
        if loaded.checked.elapsed() >= Duration::from_secs(1) {
            loaded.checked = Instant::now();
            self.reload_if_changed(&mut loaded);
        }
        // Looked up by the secret's hash: timing tells about hashes, which reveal no secret.
        loaded.by_hash.get(&hash).map(|(user, role)| Caller { user: Some(user.clone()), role: *role })
    }

    fn reload_if_changed(&self, loaded: &mut Loaded) {
        let modified = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        if modified == loaded.modified {
            return;
        }
        match read(&self.path).and_then(|(text, m)| Ok((parse_tokens(&self.path, &text)?, m))) {
            Ok((by_hash, m)) => {
                tracing::info!("read the tokens file {} again: {} tokens", self.path.display(), by_hash.len());
                loaded.by_hash = by_hash;
                loaded.modified = m;
            }
            Err(e) => {
                tracing::warn!("{e}; keeping the {} tokens read before", loaded.by_hash.len());
                loaded.modified = modified;
            }
        }
    }
}

fn read(path: &Path) -> Result<(String, Option<SystemTime>)> {
    let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    Ok((text, modified))
}

/// Warns when other users may write the tokens file (and so make themselves admins).
fn warn_if_open(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path) {
        if m.permissions().mode() & 0o022 != 0 {
            tracing::warn!("the tokens file {} may be written by other users: make it 0600 or 0644", path.display());
        }
    }
}

/// The daemon's policy for job calls.
pub enum Auth {
    /// No tokens: every caller is an anonymous admin.
    Open,
    Tokens(Tokens),
}

impl Auth {
    /// The caller of a request with this `Authorization` header value (REST) or metadata (gRPC).
    pub fn caller(&self, authorization: Option<&str>) -> Result<Caller> {
        let Auth::Tokens(tokens) = self else { return Ok(Caller::anonymous()) };
        let secret = match authorization.map(str::trim) {
            None | Some("") => {
                return Err(Error::Unauthorized(
                    "this daemon needs a token: send `Authorization: Bearer SECRET` (the CLI reads GANTRY_TOKEN)".into(),
                ))
            }
            Some(h) => bearer(h).ok_or_else(|| Error::Unauthorized("the Authorization header must be `Bearer SECRET`".into()))?,
        };
        tokens.caller(secret).ok_or_else(|| Error::Unauthorized("the token is not valid (unknown, or revoked)".into()))
    }
}

/// The secret of a `Bearer SECRET` header value.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, secret) = value.trim().split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !secret.trim().is_empty()).then(|| secret.trim())
}

/// `gantry token new`: a new secret and its entry for the tokens file (appended to `append` when
/// given, created 0600 if missing). The secret is printed once and stored nowhere.
pub fn new_token(user: &str, role: Role, append: Option<&Path>) -> anyhow::Result<(String, String)> {
    check_user_name(user).map_err(anyhow::Error::msg)?;
    let secret = new_secret()?;
    let entry = TokenEntry { user: user.to_string(), role, token_sha256: sha256_hex(&secret) };
    let text = format!("[[token]]\nuser = \"{}\"\nrole = \"{}\"\ntoken_sha256 = \"{}\"\n", entry.user, entry.role, entry.token_sha256);
    if let Some(path) = append {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        // The file must stay valid: check what is there parses before adding to it.
        let before = std::fs::read_to_string(path).unwrap_or_default();
        parse_tokens(path, &before)?;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path)?;
        let sep = if before.is_empty() || before.ends_with("\n\n") {
            ""
        } else if before.ends_with('\n') {
            "\n"
        } else {
            "\n\n"
        };
        write!(f, "{sep}{text}")?;
        f.sync_all()?;
    }
    Ok((secret, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_stands_for_its_user_and_the_file_holds_only_its_hash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let (alice, entry) = new_token("alice", Role::User, Some(&path)).unwrap();
        let (root, _) = new_token("root", Role::Admin, Some(&path)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(entry.contains("user = \"alice\"") && text.contains(&entry), "{text}");
        assert!(!text.contains(&alice) && !text.contains(&root), "secrets are never stored");
        assert!(text.contains(&sha256_hex(&alice)));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);

        let auth = Auth::Tokens(Tokens::load(&path).unwrap());
        assert_eq!(auth.caller(Some(&format!("Bearer {alice}"))).unwrap(), Caller { user: Some("alice".into()), role: Role::User });
        assert_eq!(auth.caller(Some(&format!("bearer  {root} "))).unwrap().role, Role::Admin);
        for bad in [None, Some(""), Some("Bearer"), Some("Basic abc"), Some("Bearer gantry_0000")] {
            assert!(matches!(auth.caller(bad), Err(Error::Unauthorized(_))), "{bad:?}");
        }
        assert_eq!(Auth::Open.caller(None).unwrap(), Caller::anonymous());

        // Revoked by editing the file: the daemon reads it again.
        std::thread::sleep(Duration::from_millis(1100));
        let kept: String = text.split("\n\n").filter(|e| !e.contains("alice")).collect::<Vec<_>>().join("\n\n");
        std::fs::write(&path, kept).unwrap();
        let Auth::Tokens(t) = &auth else { unreachable!() };
        assert!(t.caller(&alice).is_none(), "alice's token was revoked");
        assert!(t.caller(&root).is_some());
    }

    #[test]
    fn users_act_on_their_own_jobs_and_admins_on_any() {
        let alice = Caller { user: Some("alice".into()), role: Role::User };
        let admin = Caller { user: Some("root".into()), role: Role::Admin };
        assert!(alice.may_change(Some("alice")) && !alice.may_change(Some("bob")) && !alice.may_change(None));
        assert!(admin.may_change(Some("bob")) && admin.may_change(None));
        let err = alice.check_may_change(7, Some("bob"), "cancel").unwrap_err();
        assert!(matches!(err, Error::Forbidden(ref m) if m.contains("alice may not cancel job 7: it belongs to bob")), "{err}");
    }

    #[test]
    fn a_bad_tokens_file_is_refused_naming_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        for (text, says) in [
            ("[[token]]\nuser = \"a\"\nrole = \"root\"\ntoken_sha256 = \"00\"\n", "unknown variant"),
            ("[[token]]\nuser = \"a b\"\nrole = \"user\"\ntoken_sha256 = \"00\"\n", "token 1 (a b): `a b` is not a user name"),
            ("[[token]]\nuser = \"a\"\nrole = \"user\"\ntoken_sha256 = \"00\"\n", "token 1 (a): token_sha256 must be 64 hex digits"),
            ("[[token]]\nuser = \"a\"\nrole = \"user\"\nsecret = \"x\"\n", "unknown field"),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = Tokens::load(&path).err().unwrap().to_string();
            assert!(err.contains(says) && err.contains("tokens.toml"), "{err}");
        }
    }
}
