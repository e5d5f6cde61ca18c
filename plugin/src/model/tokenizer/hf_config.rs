//! The special-token settings that transformers keeps beside a tokenizer:
//! `tokenizer_config.json` and `special_tokens_map.json`.
//!
//! They decide which ids BOS and EOS are and whether `tokenizer(text)` adds them. transformers
//! applies `special_tokens_map.json` over `tokenizer_config.json`, so the same precedence is kept.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::model::error::{ModelError, Result};

pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
pub const SPECIAL_TOKENS_MAP: &str = "special_tokens_map.json";

/// A special token's text and the file that named it (for error messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedToken {
    pub content: String,
    pub file: PathBuf,
}

/// What the JSON files say; `None` where they are silent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokenConfig {
    pub bos: Option<NamedToken>,
    pub eos: Option<NamedToken>,
    pub unk: Option<NamedToken>,
    pub add_bos_token: Option<bool>,
    pub add_eos_token: Option<bool>,
}

impl SpecialTokenConfig {
    /// Reads whichever of the two files exist in `dir`. A file that exists but is not JSON is an
    /// error: silently falling back to defaults could shift every id.
    pub fn read(dir: &Path) -> Result<Self> {
        let mut config = SpecialTokenConfig::default();
        for name in [TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP] {
            let path = dir.join(name);
            if !path.is_file() {
                continue;
            }
            let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
            let json: Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::bad_file(&path, format!("not valid JSON: {e}")))?;
            config.apply(&json, &path)?;
        }
        Ok(config)
    }

    fn apply(&mut self, json: &Value, path: &Path) -> Result<()> {
        let Some(map) = json.as_object() else {
            return Err(ModelError::bad_file(path, "expected a JSON object"));
        };
        for (key, slot) in [
            ("bos_token", &mut self.bos),
            ("eos_token", &mut self.eos),
            ("unk_token", &mut self.unk),
        ] {
            if let Some(content) = token_content(map.get(key), key, path)? {
                *slot = Some(NamedToken {
                    content,
                    file: path.to_owned(),
                });
            }
        }
        for (key, slot) in [
            ("add_bos_token", &mut self.add_bos_token),
            ("add_eos_token", &mut self.add_eos_token),
        ] {
            match map.get(key) {
                None | Some(Value::Null) => {}
                Some(Value::Bool(b)) => *slot = Some(*b),
                Some(other) => {
                    return Err(ModelError::bad_file(
                        path,
                        format!("`{key}` should be true or false, found {other}"),
                    ))
                }
            }
        }
        Ok(())
    }
}

/// A token is written either as a string or as an `AddedToken` object with a `content` field.
fn token_content(value: Option<&Value>, key: &str, path: &Path) -> Result<Option<String>> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(o)) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(ModelError::bad_file(
                path,
                format!("`{key}` object has no string `content`"),
            )),
        },
        Some(other) => Err(ModelError::bad_file(
            path,
            format!("`{key}` should be a string, found {other}"),
        )),
    }
}
