//! Where downloads come from and go to. The element and the command-line tools read the
//! standard environment variables of the Hugging Face tools (they choose *where* files come
//! from, never how the model computes); tests and applications may fill the struct directly.

use std::path::PathBuf;
use std::time::Duration;

/// The public hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Folder of this project's own files under the assets cache (URL downloads, verification
/// records): `$HF_HOME/assets/gst-llamavid` by default, as `huggingface_hub` lays out the files
/// of libraries that use its cache.
pub const ASSETS_FOLDER: &str = "gst-llamavid";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubConfig {
    /// Base URL of the hub or of a mirror (`HF_ENDPOINT`), without a trailing `/`.
    pub endpoint: String,
    /// The hub cache in `huggingface_hub`'s layout (`HF_HUB_CACHE`, default `$HF_HOME/hub`):
    /// `models--owner--name/{blobs,refs,snapshots}`, shared with Python tools.
    pub hub_cache: PathBuf,
    /// This project's own folder (`$HF_ASSETS_CACHE/gst-llamavid`, default
    /// `$HF_HOME/assets/gst-llamavid`): URL downloads and records of verified files.
    pub assets: PathBuf,
    /// Bearer token for the hub (`HF_TOKEN`, else the token file `huggingface-cli login`
    /// writes). Sent only to the endpoint, never to other hosts.
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE=1`: use the cache only, never the network.
    pub offline: bool,
    /// Longest wait for a connection, a response or the next bytes of a download.
    pub timeout: Duration,
}

/// `huggingface_hub`'s reading of boolean variables.
fn is_true(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_uppercase().as_str(),
        "1" | "ON" | "YES" | "TRUE"
    )
}

impl HubConfig {
    /// The configuration the environment describes: `HF_ENDPOINT`, `HF_HOME`, `HF_HUB_CACHE`
    /// (or the older `HUGGINGFACE_HUB_CACHE`), `HF_ASSETS_CACHE`, `HF_TOKEN` (or
    /// `HUGGING_FACE_HUB_TOKEN`), `HF_TOKEN_PATH`, `HF_HUB_OFFLINE`, `XDG_CACHE_HOME`, `HOME`.
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`from_env`](Self::from_env) with the variables read through `var`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let hf_home = set("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let cache = set("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| set("HOME").map(|home| PathBuf::from(home).join(".cache")))
                .unwrap_or_else(|| std::env::temp_dir().join("gst-llamavid-cache"));
            cache.join("huggingface")
        });
        let hub_cache = set("HF_HUB_CACHE")
            .or_else(|| set("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let assets = set("HF_ASSETS_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("assets"))
            .join(ASSETS_FOLDER);
        let token = set("HF_TOKEN")
            .or_else(|| set("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| {
                let path = set("HF_TOKEN_PATH")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| hf_home.join("token"));
                std::fs::read_to_string(path).ok()
            })
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty());
        let endpoint = set("HF_ENDPOINT")
            .unwrap_or_else(|| DEFAULT_ENDPOINT.into())
            .trim()
            .trim_end_matches('/')
            .to_owned();
        Self {
            endpoint,
            hub_cache,
            assets,
            token,
            offline: set("HF_HUB_OFFLINE").is_some_and(|v| is_true(&v)),
            timeout: Duration::from_secs(60),
        }
    }

    /// A configuration with every location under `root` (tests, sandboxes).
    pub fn in_dir(root: impl Into<PathBuf>, endpoint: impl Into<String>) -> Self {
        let root = root.into();
        Self {
            endpoint: endpoint.into().trim_end_matches('/').to_owned(),
            hub_cache: root.join("hub"),
            assets: root.join("assets").join(ASSETS_FOLDER),
            token: None,
            offline: false,
            timeout: Duration::from_secs(60),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> HubConfig {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        HubConfig::from_vars(|name| vars.get(name).cloned())
    }

    #[test]
    fn defaults_follow_huggingface_hub() {
        let c = config(&[("HOME", "/home/u")]);
        assert_eq!(c.endpoint, "https://huggingface.co");
        assert_eq!(c.hub_cache, PathBuf::from("/home/u/.cache/huggingface/hub"));
        assert_eq!(
            c.assets,
            PathBuf::from("/home/u/.cache/huggingface/assets/gst-llamavid")
        );
        assert_eq!(c.token, None);
        assert!(!c.offline);
        let c = config(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/xdg")]);
        assert_eq!(c.hub_cache, PathBuf::from("/xdg/huggingface/hub"));
    }

    #[test]
    fn every_variable_is_honoured() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "hf_from_file\n").unwrap();
        let home = dir.path().to_str().unwrap();
        let c = config(&[
            ("HF_HOME", home),
            ("HF_ENDPOINT", "http://127.0.0.1:9/"),
            ("HF_HUB_OFFLINE", "yes"),
        ]);
        assert_eq!(c.endpoint, "http://127.0.0.1:9");
        assert_eq!(c.hub_cache, dir.path().join("hub"));
        assert_eq!(c.token.as_deref(), Some("hf_from_file"));
        assert!(c.offline);
        let c = config(&[
            ("HF_HOME", home),
            ("HF_HUB_CACHE", "/big/disk/hub"),
            ("HF_ASSETS_CACHE", "/big/disk/assets"),
            ("HF_TOKEN", "hf_from_env"),
            ("HF_HUB_OFFLINE", "0"),
        ]);
        assert_eq!(c.hub_cache, PathBuf::from("/big/disk/hub"));
        assert_eq!(c.assets, PathBuf::from("/big/disk/assets/gst-llamavid"));
        assert_eq!(c.token.as_deref(), Some("hf_from_env"));
        assert!(!c.offline);
        let other = dir.path().join("other-token");
        std::fs::write(&other, "hf_other").unwrap();
        let c = config(&[
            ("HF_HOME", home),
            ("HF_TOKEN_PATH", other.to_str().unwrap()),
        ]);
        assert_eq!(c.token.as_deref(), Some("hf_other"));
    }
}
